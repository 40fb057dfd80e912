"""Stage captions."""
