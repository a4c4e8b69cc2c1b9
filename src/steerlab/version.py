"""The package version (its own module so any module can import it at top level)."""

__version__ = "0.1.0"
