"""maskx cache commands (being filled in)."""
