"""maskx predict commands (being filled in)."""
