"""One package per method; each registers itself with the core."""
