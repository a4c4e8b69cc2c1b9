"""Weight edits and exports: orthogonalization, HF folders, LoRA, GGUF."""
