"""Model parts: the torchvision detector, the weight transfer function T, mask heads, assembly."""
