"""The README's support matrix (DDP, FSDP1, FSDP2), computed from the code that decides it (`lit_optim.docs`).

Each cell runs the checks `OptimizerMixin.configure_optimizers` runs before step 1 -- the optimizer's own
``check_trainer`` (in-backward, offload) and then `check_trainer_compatibility` on its spec -- against a stand-in
Trainer holding the real Lightning strategy, so the table cannot drift from the refusals. A cell the code allows
names the test that trains it that way; `TESTED_BY` is the one hand-kept part, and tests/test_support_matrix.py
checks that each name there is a real test.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from lit_optim.spec import CPU

STRATEGIES = ("DDP", "FSDP1", "FSDP2")
_DDP_TEST = "tests/test_lowrank_ddp.py::test_every_ddp_family_keeps_ranks_identical"
_FSDP_TEST = "tests/test_fsdp2_lowbit.py::test_fsdp2_steps_sharded_parameters_like_one_process"
_FSDP_RESUME_TEST = "tests/test_fsdp2_resume.py::test_fsdp2_adamw_torch_resumes_exactly_from_sharded_checkpoint"
_FSDP_FUSED_RESUME_TEST = "tests/test_fsdp2_resume.py::test_fsdp2_fused_lowbit_resumes_exactly_from_sharded_checkpoint"
_FSDP_TORCHAO_TEST = ("tests/test_fsdp2_resume.py::"
                      "test_fsdp2_torchao_lowbit_resumes_exactly_through_lightning_on_two_ranks")
_FSDP_OTHERS_RESUME_TEST = "tests/test_fsdp2_resume.py::test_fsdp2_muon_stable_and_schedule_free_resume_exactly"
_THROUGH_LIGHTNING = " (exact resume, also through Lightning's ModelParallelStrategy on one device"
_FSDP1_TEST = "tests/test_fsdp1.py::test_fsdp1_steps_like_one_process_and_resumes_exactly"
REFUSAL_TEST = "tests/test_support_matrix.py::test_refused_cell_stops_before_step_1"
NOT_ON_CPU = "untested: its step needs CUDA and no multi-GPU machine has run it yet"


@dataclass(frozen=True)
class Family:
    label: str
    configs: tuple[dict[str, Any], ...]  # every registry name (and option) the row stands for
    build: bool = False  # built on a tiny model: its optimizer object adds its own Trainer check

    @property
    def key(self) -> str:
        return self.label.split(" (")[0]


def _names(pred) -> tuple[dict[str, Any], ...]:
    from lit_optim.registry import get_spec, list_optimizers

    return tuple({"name": n} for n in list_optimizers() if pred(get_spec(n)))


def families() -> list[Family]:
    import lit_optim.specs.in_backward_specs as ib

    return [
        Family("torch AdamW (`adamw_torch`, `adamw_torch_fused`)", ({"name": "adamw_torch"},
                                                                    {"name": "adamw_torch_fused"})),
        Family("torchao 8-bit/4-bit (`adam[w]_torch_8bit`, `adam[w]_torch_4bit`)",
               _names(lambda s: s.backend == "torchao" and not s.requires_cuda)),
        Family("torchao FP8 (`adamw_fp8`, `adam_fp8`)", _names(lambda s: s.backend == "torchao" and s.requires_cuda)),
        Family("bitsandbytes 8-bit, 32-bit and paged (every bnb name)", _names(lambda s: s.backend == "bitsandbytes")),
        Family("GaLore/APOLLO/Adam-mini (`galore*`, `apollo*`, `adam_mini`)",
               _names(lambda s: s.name.startswith(("galore", "apollo", "adam_mini")) and "_layerwise" not in s.name)),
        Family("in-backward (`in_backward: true`, `*_layerwise`, `lomo`, `adalomo`)",
               ({"name": "adamw_torch", "in_backward": True}, *({"name": s.name} for s in ib.SPECS)), build=True),
        Family("CPU offload (`offload: cpu`)", ({"name": "adamw_torch", "offload": "cpu"},), build=True),
        Family("CPU offload with gradients (`offload_gradients: true`)",
               ({"name": "adamw_torch", "offload": "cpu", "offload_gradients": True},), build=True),
        Family("lit_optim fused low-bit (`adamw_fused_8bit`, `*_fused_4bit`, ...)",
               _names(lambda s: s.target.startswith("lit_optim.optimizers.lowbit:"))),
        Family("FlashOptim (`flash_*`)", _names(lambda s: s.backend == "flashoptim")),
        Family("Muon (`muon`)", ({"name": "muon"},)),
        Family("torch Adafactor (`adafactor_torch`)", ({"name": "adafactor_torch"},)),
        Family("StableAdamW (`stable_adamw`)", ({"name": "stable_adamw"},)),
        Family("schedule-free (`schedule_free_*`)", _names(lambda s: s.backend == "schedulefree")),
    ]


# (family key, strategy) -> the test that trains the family that way; every cell the code allows must be here.
TESTED_BY = {
    ("torch AdamW", "DDP"): _DDP_TEST,
    ("torch AdamW", "FSDP1"): _FSDP1_TEST + " (FSDP1 on 2 CPU ranks against one process, and exact resume through the"
                              " full and the sharded checkpoint calls Lightning's FSDPStrategy makes)",
    ("torch AdamW", "FSDP2"): _FSDP_RESUME_TEST + " (exact resume from a torch.distributed.checkpoint save;"
                              " stepping against one process: `" + _FSDP_TEST + "`)",
    ("torchao 8-bit/4-bit", "DDP"): _DDP_TEST,
    ("torchao 8-bit/4-bit", "FSDP2"): _FSDP_TORCHAO_TEST + " (exact resume through Lightning's"
                                      " ModelParallelStrategy on 2 CPU ranks sharing one compile cache, with weights"
                                      " whose rows split unevenly)",
    ("torchao FP8", "DDP"): NOT_ON_CPU,
    ("bitsandbytes 8-bit, 32-bit and paged", "DDP"): _DDP_TEST,
    ("GaLore/APOLLO/Adam-mini", "DDP"): _DDP_TEST,
    ("CPU offload", "DDP"): "tests/test_distributed.py::test_ddp_with_offload_matches_ddp_without",
    ("lit_optim fused low-bit", "DDP"): _DDP_TEST,
    ("lit_optim fused low-bit", "FSDP2"): _FSDP_FUSED_RESUME_TEST + " (exact resume from a torch.distributed.checkpoint"
                                          " save on the same number of ranks; another number is refused)",
    ("FlashOptim", "DDP"): NOT_ON_CPU,
    ("Muon", "DDP"): _DDP_TEST,
    ("Muon", "FSDP2"): _FSDP_OTHERS_RESUME_TEST + _THROUGH_LIGHTNING + "; stepping against one process, within bf16"
                       " rounding of its Newton-Schulz iterations: `" + _FSDP_TEST + "`)",
    ("torch Adafactor", "DDP"): _DDP_TEST,
    ("StableAdamW", "DDP"): _DDP_TEST,
    ("StableAdamW", "FSDP2"): _FSDP_OTHERS_RESUME_TEST + _THROUGH_LIGHTNING + "; stepping against one process,"
                              " exactly: `" + _FSDP_TEST + "`)",
    ("schedule-free", "DDP"): _DDP_TEST,
    ("schedule-free", "FSDP1"): _FSDP1_TEST,
    ("schedule-free", "FSDP2"): _FSDP_OTHERS_RESUME_TEST + _THROUGH_LIGHTNING + "; schedule_free_adamw stepping"
                                " against one process, exactly: `" + _FSDP_TEST + "`)",
}


def strategy(kind: str):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    # FSDP1 is Lightning's FSDPStrategy (strategy="fsdp"); FSDP2 is its ModelParallelStrategy (fully_shard).
    return {"DDP": DDPStrategy, "FSDP1": FSDPStrategy, "FSDP2": ModelParallelStrategy}[kind]()


def _first_clause(text: str) -> str:
    """A problem's reason up to its first ';', ':' or '. ' outside parentheses."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and (ch in ";:" or text[i:i + 2] == ". "):
            return text[:i]
    return text.rstrip(".")


def refusal(optim: dict[str, Any], kind: str, build: bool) -> str | None:
    """Why the checks before step 1 refuse `optim` under strategy `kind`, in one clause; None if they allow it."""

    with warnings.catch_warnings():
        return _refusal(optim, kind, build)


def _refusal(optim: dict[str, Any], kind: str, build: bool) -> str | None:
    from torch import nn

    from lit_optim.build import build_optimizer
    from lit_optim.errors import IncompatibleConfigError
    from lit_optim.mixin import check_trainer_compatibility
    from lit_optim.registry import get_spec

    trainer = SimpleNamespace(strategy=strategy(kind), gradient_clip_val=None, accumulate_grad_batches=1,
                              precision_plugin=SimpleNamespace(scaler=None))
    spec = get_spec(optim["name"])
    quiet = logging.getLogger("lit_optim")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        warnings.simplefilter("ignore")  # build-time advice (rank vs a tiny layer) is not what this asks
        if build and CPU in spec.supports:
            options = {k: v for k, v in optim.items() if k != "name"}
            optimizer = build_optimizer(nn.Sequential(nn.Linear(8, 8)), optim["name"], **options)
            if callable(getattr(optimizer, "check_trainer", None)):
                optimizer.check_trainer(trainer)
            spec = optimizer.lit_optim.spec
        check_trainer_compatibility(spec, trainer, "cuda")  # the device check is not the strategy's
    except IncompatibleConfigError as err:
        return _first_clause(str(err).split("this Trainer: ", 1)[1])
    finally:
        quiet.setLevel(level)
    return None


def cells() -> list[tuple[Family, dict[str, str | None]]]:
    """Per family: {strategy: refusal reason, or None where it is allowed}. A family whose names disagree is an
    error: split the row."""
    out = []
    for family in families():
        row = {}
        for kind in STRATEGIES:
            reasons = {refusal(c, kind, family.build) for c in family.configs}
            if len(reasons) != 1:
                raise ValueError(f"{family.label} under {kind}: its names disagree ({reasons}); split the row")
            row[kind] = reasons.pop()
        out.append((family, row))
    return out


def matrix_table() -> str:
    lines = ["| Optimizer family | " + " | ".join(STRATEGIES) + " |", "|---|" + "---|" * len(STRATEGIES)]
    for family, row in cells():
        texts = []
        for kind in STRATEGIES:
            if row[kind] is None:
                tested = TESTED_BY.get((family.key, kind))
                if tested is None:
                    raise ValueError(f"{family.key} under {kind} is allowed: name its test in TESTED_BY")
                test, _, note = tested.partition(" (")
                texts.append(f"supported, tested by `{test}`" + (f" ({note}" if note else "")
                             if tested.startswith("tests/") else f"supported, {tested}")
            else:
                texts.append(f"refused before step 1: {row[kind]}")
        lines.append(f"| {family.label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)
