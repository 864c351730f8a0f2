"""Placeholder module, filled in by the method-zoo work (issue 3)."""
