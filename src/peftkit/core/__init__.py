"""Core: target matching, injection, adapter registry, state dicts and files."""
