"""Importing this module registers every spec. Add a new backend module to the list below."""

from lit_optim.specs import bnb_specs, extra_specs, torch_specs, torchao_specs  # noqa: F401
from lit_optim.specs import lowrank_specs  # noqa: F401,E402  (GaLore, APOLLO, Adam-mini; after the inner optimizers)
from lit_optim.specs import in_backward_specs  # noqa: F401,E402  (<name>_layerwise, LOMO, AdaLomo)
