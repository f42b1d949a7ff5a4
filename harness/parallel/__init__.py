"""Parallelism applied to an unchanged model by small apply_* functions."""
