"""Einsum building blocks shared by the model families. Nothing here knows a family."""
