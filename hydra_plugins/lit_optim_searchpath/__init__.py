"""Hydra search-path plugin: lit_optim's config groups (optim, scheduler, ...) in every Hydra app after install."""
