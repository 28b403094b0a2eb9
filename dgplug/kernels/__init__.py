"""dgplug.kernels."""
