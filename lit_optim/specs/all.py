"""Every spec module, in registry order; `lit_optim.registry` registers `SPECS` on first use. Add a new backend
module to `MODULES`."""

from lit_optim.specs import (
    bnb_specs,
    extra_specs,
    flashoptim_specs,
    fused_specs,
    in_backward_specs,
    lowrank_specs,
    torch_specs,
    torchao_specs,
)

MODULES = (bnb_specs, extra_specs, lowrank_specs, in_backward_specs, torch_specs, torchao_specs, fused_specs,
           flashoptim_specs)
SPECS = [spec for module in MODULES for spec in module.SPECS]
