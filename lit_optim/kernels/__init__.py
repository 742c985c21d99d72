"""Plain tensor math of lit_optim's own low-bit optimizers, below the optimizer classes.

- `codes`: how a block of moments becomes codes and a scale, and back (the one definition both paths follow).
- `reference`: the step in plain torch, tensor by tensor: the semantics, and the CPU path.
- `triton_lowbit`: the same step as one fused Triton launch over many tensors (CUDA); imported only when used.
"""
