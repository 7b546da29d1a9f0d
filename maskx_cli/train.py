"""maskx train commands (being filled in)."""
