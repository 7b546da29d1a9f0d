"""Commands of the four stages; filled in below."""
