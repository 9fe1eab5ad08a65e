"""Models built on the fused ops."""
