"""Small shared helpers: atomic files and folders, strict JSON, checksums."""
