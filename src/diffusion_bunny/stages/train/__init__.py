"""Stage train."""
