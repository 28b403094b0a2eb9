"""dgplug.converters."""
