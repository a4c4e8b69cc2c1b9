"""Prompt sets, file formats and chat templating: what goes into the model."""
