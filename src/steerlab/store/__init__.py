"""Files on disk: atomic writes, the resumable row store, output paths, provenance."""
