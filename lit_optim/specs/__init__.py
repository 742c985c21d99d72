"""Optimizer specs, one module per backend. `all.py` imports them in registry order."""
