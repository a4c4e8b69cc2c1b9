"""Loading models (HF folders, GGUF, the embedded default) and architecture adapters."""
