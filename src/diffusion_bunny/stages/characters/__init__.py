"""Stage characters."""
