"""Importing this module registers every spec. Add a new backend module to the list below."""

from lit_optim.specs import (  # noqa: F401
    bnb_specs,
    extra_specs,
    in_backward_specs,
    lowrank_specs,
    torch_specs,
    torchao_specs,
)
