"""Stand-ins for the container images a lab's pods run, as plain processes (there is no container runtime)."""
