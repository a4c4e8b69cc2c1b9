"""Report files and plots."""
