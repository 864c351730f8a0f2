"""Distiller and taps: the one contract every feature plugs into."""
