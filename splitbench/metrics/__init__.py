"""Pure metric functions over request records and run metadata (rendering lives in render/)."""
