"""Stage quality."""
