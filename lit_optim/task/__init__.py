"""The built-in task `lit-optim train` runs: a small causal language model on generated data (no downloads)."""
