"""Built-in container images: stand-ins for the images a lab's pods run, as plain Python processes (there is
no container runtime), started as `python -m images.agnhost ...`."""
