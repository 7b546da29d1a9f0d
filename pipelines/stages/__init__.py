"""The product's stages: each a plain function of a typed config that returns a result."""
