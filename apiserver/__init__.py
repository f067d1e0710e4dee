"""The API server's role: admission (every layer's checks) and storage of the desired state."""
