"""Optional backends, imported lazily."""
