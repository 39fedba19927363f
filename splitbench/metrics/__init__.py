"""Pure metric functions over request records, and report rendering."""
