"""Batched, KV-cached generation under interventions."""
