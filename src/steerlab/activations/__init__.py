"""Batched forward passes that record residual-stream activations."""
