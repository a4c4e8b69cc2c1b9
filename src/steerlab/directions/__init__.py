"""Directions: extraction, per-layer separability, selection, the saved artifact."""
