"""Stage scenes."""
