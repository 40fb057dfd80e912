"""Stage generate."""
