"""maskx sweep commands (being filled in)."""
