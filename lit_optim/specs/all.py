"""Importing this module registers every spec. Add a new backend module to the list below."""

from lit_optim.specs import bnb_specs, extra_specs, torch_specs, torchao_specs  # noqa: F401
