"""Lightning callbacks that make optimizer memory and speed visible, in W&B and any Lightning logger.

    from lit_optim.callbacks import default_monitors
    trainer = L.Trainer(callbacks=default_monitors(), logger=CSVLogger("logs"))

- `OptimizerStateMonitor` (``optim_state/*``): real state bytes by location, dtype, quantized vs full precision, group;
- `SpeedMonitor` (``throughput/*``): samples/s, tokens/s, FLOP/s and MFU via Lightning's `Throughput`;
- `StepTimingMonitor` (``timing/*``): optimizer step, forward+backward, data wait; warm-up reported apart;
- `DeviceMemoryMonitor` (``memory/*``): peak allocated/reserved per interval, managed and pinned memory, headroom;
- `WandbExtras`: W&B summaries, the built optimizer in the run config, a state table per param group;
- `DeviceMemoryBudget`: caps this process's GPU memory (plan for a smaller card on a big one); logs nothing.

Each class documents what it logs in its "Logged metrics" section.
"""

from lit_optim.callbacks.device_memory import DeviceMemoryMonitor
from lit_optim.callbacks.memory_budget import DeviceMemoryBudget
from lit_optim.callbacks.state_memory import OptimizerStateMonitor
from lit_optim.callbacks.step_timing import StepTimingMonitor
from lit_optim.callbacks.throughput import SpeedMonitor
from lit_optim.callbacks.wandb_extras import WandbExtras

__all__ = [
    "DeviceMemoryBudget",
    "DeviceMemoryMonitor",
    "OptimizerStateMonitor",
    "SpeedMonitor",
    "StepTimingMonitor",
    "WandbExtras",
    "default_monitors",
]


def default_monitors(log_every_n_steps: int | None = None) -> list:
    """One of each monitor, logging every `log_every_n_steps` optimizer steps (None: the trainer's interval)."""
    return [
        OptimizerStateMonitor(log_every_n_steps),
        SpeedMonitor(log_every_n_steps),
        StepTimingMonitor(log_every_n_steps),
        DeviceMemoryMonitor(log_every_n_steps),
        WandbExtras(),
    ]
