"""Intervention specs (what to do) and the hooks that apply them (steer())."""
