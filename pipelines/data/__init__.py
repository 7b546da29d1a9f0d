"""Data sets in one internal format: COCO-style dicts (images, annotations, categories)."""
