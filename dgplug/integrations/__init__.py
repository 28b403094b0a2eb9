"""dgplug.integrations."""
