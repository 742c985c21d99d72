"""An existing Hydra application that knows nothing about lit_optim except one defaults entry in its config.

After `pip install lit-optim`, lit_optim's search-path plugin puts `pkg://lit_optim.conf` on every Hydra app's search
path, so `conf/config.yaml` can say `- optim: adamw_8bit` and the command line can switch optimizers:

    python my_app.py optim=paged_adamw_8bit optim.lr=2e-5

It fits a small regression model for a few steps and prints what was built, for tests/test_searchpath_plugin.py.
"""

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import lit_optim


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, 1))
    x = torch.randn(256, cfg.width)
    y = x[:, :1] * 2.0 - x[:, 1:2]
    optimizer = lit_optim.build_optimizer(model, **OmegaConf.to_container(cfg.optim, resolve=True))
    losses = []
    for _ in range(cfg.steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    group = optimizer.param_groups[0]
    print(f"optimizer_class={type(optimizer).__module__}.{type(optimizer).__name__}")
    print(f"optimizer_name={optimizer.lit_optim.name}")
    print(f"lr={float(group['lr'])!r}")
    betas = group.get("betas")
    print(f"betas_type={type(betas).__name__} betas={','.join(map(str, betas or ()))}")
    print(f"loss_first={losses[0]:.6f} loss_last={losses[-1]:.6f}")
    print(f"lit_optim_file={lit_optim.__file__}")


if __name__ == "__main__":
    main()
