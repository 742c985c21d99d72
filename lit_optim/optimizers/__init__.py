"""Optimizers lit_optim implements itself (compositions the backends do not offer as one object)."""
