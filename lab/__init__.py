"""Lab layer: builds, runs and tears down a lab from a validated spec."""
