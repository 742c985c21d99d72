"""Hugging Face parity: each Trainer `optim` name lit_optim builds is what transformers' Trainer builds.

The oracle is transformers' own code: `Trainer.create_optimizer` (its decay/no-decay groups from
`get_decay_parameter_names`, `get_optimizer_cls_and_kwargs`, the bitsandbytes 32-bit embedding override) run on a
stand-in Trainer, with arguments holding `TrainingArguments`' own field defaults. lit_optim builds from
`from_hf_training_args(args)`. Both step 6 times on identical gradients; class, every group hyperparameter, the
no-decay set, bits/paging and the parameters must agree. Names that differ on purpose are listed with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.errors import HyperparameterError
from lit_optim.hf_names import HF_TRAINER_NAMES, OUT_OF_SCOPE
from lit_optim.registry import availability, get_spec

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.training_args import ParallelMode  # noqa: E402

STEPS = 6
RTOL = 1e-6
LR = 1e-3
_FIELDS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "optim_args",
           "optim_target_modules", "warmup_steps", "gradient_accumulation_steps")
HF_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.name in _FIELDS}

# Packages transformers needs for a name and lit_optim does not (it has its own implementation).
HF_NEEDS = {"galore": "galore_torch", "apollo": "apollo_torch", "lomo": "lomo_optim", "adalomo": "lomo_optim"}
# Deliberate differences, checked by their own tests (test_galore.py, test_apollo.py, test_lomo.py).
DELIBERATE = {
    "galore": "lit_optim's GaLore: non-targeted parameters keep lit_optim's decay/no-decay groups with "
              "args.weight_decay (HF gives them the class default and ignores args.weight_decay), and 'all-linear' "
              "leaves out the output head (HF's includes lm_head)",
    "apollo": "lit_optim's APOLLO: the same weight-decay and 'all-linear' choices as GaLore",
    "lomo": "lit_optim's LOMO/AdaLomo step in the backward pass through lit_optim's in-backward wrapper",
}
# Not the same Python class, the same optimizer: the assertion used instead is given with the reason.
SAME_ALGORITHM = {
    # bitsandbytes' AdamW8bit/PagedLion8bit/... are its generic class with optim_bits/is_paged preset; lit_optim uses
    # the named class so the type says the bits. Checked: bnb optimizer kind, bits, paging, min_8bit_size, steps.
    "bitsandbytes": "bnb generic class vs its named-bits subclass",
    # transformers is not a lit_optim dependency; lit_optim's Adafactor is the relative_step=False,
    # scale_parameter=False, beta1=None update. Checked: shared hyperparameters, HF's extra flags, steps.
    "adafactor": "transformers' Adafactor vs lit_optim's absolute-lr Adafactor",
}
# torchao compiles its step per shape on first use (tens of seconds on 2 cores).
SLOW = {"adamw_torch_8bit", "adamw_torch_4bit"}


def _lowrank_key(name: str) -> str | None:
    for key in ("galore", "apollo", "adalomo", "lomo"):
        if name.startswith(key):
            return key
    return None


def _case(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


HF_NAMES = sorted(HF_TRAINER_NAMES - set(OUT_OF_SCOPE))


class Net(nn.Module):
    """Embedding, LayerNorm, an RMSNorm named like HF models' norms, biases, 4096-element weights, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 64)
        self.down = nn.Linear(64, 64)
        self.small = nn.Linear(64, 8)
        self.out_norm = nn.RMSNorm(64)
        self.lm_head = nn.Linear(64, 64, bias=False)


class _TrainerStandIn:
    """The parts of `Trainer` that `create_optimizer` uses, so transformers' own method runs unchanged.

    (A real Trainer needs accelerate and a PreTrainedModel; create_optimizer needs neither.)
    """

    create_optimizer = Trainer.create_optimizer
    get_decay_parameter_names = Trainer.get_decay_parameter_names
    get_optimizer_cls_and_kwargs = staticmethod(Trainer.get_optimizer_cls_and_kwargs)

    def __init__(self, model, args) -> None:
        self.model, self.args = model, args
        self.optimizer = None
        self.optimizer_cls_and_kwargs = None


def hf_args(optim: str, **given) -> SimpleNamespace:
    """TrainingArguments' defaults, the user's values on top (a real one needs accelerate to construct)."""
    return SimpleNamespace(**{**HF_DEFAULTS, "optim": optim, "parallel_mode": ParallelMode.NOT_DISTRIBUTED, **given})


@pytest.fixture
def fresh_bnb_manager():
    """HF registers its embedding override on bitsandbytes' process-wide manager: give it a fresh one per test."""
    if importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    import bitsandbytes as bnb

    cls = bnb.optim.GlobalOptimManager
    saved, cls._instance = cls._instance, None
    try:
        yield
    finally:
        cls._instance = saved


def _plain(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    return v


def group_of(optimizer, model) -> dict[str, dict]:
    """Parameter name -> its group's hyperparameters (tensors as numbers)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: {k: _plain(v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups for p in g["params"]}


def step_both(pairs, steps=STEPS):
    """Identical gradients for both models, `steps` optimizer steps each."""
    gen = torch.Generator().manual_seed(1)
    names = [n for n, _ in pairs[0][1].named_parameters()]
    for _ in range(steps):
        grads = {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in pairs[0][1].named_parameters()}
        for opt, model in pairs:
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return names


def as_training(theirs) -> None:
    """HF's Trainer puts a schedule-free optimizer in train mode before its first step; lit_optim builds it in train
    mode (lit_optim.schedule_free says why): the two are compared as they are when step 1 runs."""
    if "ScheduleFree" in type(theirs).__name__:
        theirs.train()


def build_both(args, cfg=None):
    """HF's optimizer from `args`; lit_optim's from `cfg`, by default `from_hf_training_args(args)`."""
    torch.manual_seed(0)
    hf_model = Net()
    ours_model = Net()
    ours_model.load_state_dict(hf_model.state_dict())
    theirs = _TrainerStandIn(hf_model, args).create_optimizer()
    for group in theirs.param_groups:
        # optimi takes its Triton step even for CPU tensors when Triton is installed, and Triton has no CPU driver:
        # lit_optim keeps CPU parameters on optimi's torch path (builders/construct.py); do the same for HF's object.
        if "triton" in group and group["triton"] is None:
            group["triton"] = False
    as_training(theirs)
    cfg = cfg or lit_optim.from_hf_training_args(args)
    ours = lit_optim.build_optimizer(ours_model, **cfg)
    return (theirs, hf_model), (ours, ours_model), cfg


def assert_same_optimizer(name, theirs, hf_model, ours, ours_model):
    spec = get_spec(name)
    if spec.backend == "bitsandbytes":
        assert ours.optimizer_name == theirs.optimizer_name, SAME_ALGORITHM["bitsandbytes"]
        for key in ("optim_bits", "min_8bit_size", "max_unorm", "skip_zeros"):
            assert getattr(ours.args, key) == getattr(theirs.args, key), key
        assert bool(ours.is_paged) == bool(theirs.is_paged) == spec.paged
        assert ours.args.optim_bits == spec.bits
    elif name == "adafactor":
        assert type(theirs).__module__.startswith("transformers") and type(ours) is spec.load_class()
    else:
        assert type(ours) is type(theirs), (type(ours), type(theirs))

    # Settings kept on the optimizer rather than in its groups (torchao's block size and rounding).
    for attr in ("block_size", "bf16_stochastic_round"):
        if hasattr(theirs, attr):
            assert getattr(ours, attr) == getattr(theirs, attr), (attr, getattr(ours, attr), getattr(theirs, attr))

    hf_groups, our_groups = group_of(theirs, hf_model), group_of(ours, ours_model)
    for pname, hf_group in hf_groups.items():
        mine = our_groups[pname]
        shared = set(hf_group) & set(mine)
        if name == "adafactor":
            # HF's flags lit_optim's Adafactor has no switch for must be at the values it implements.
            extra = {k: hf_group[k] for k in set(hf_group) - shared}
            assert extra == {"relative_step": False, "warmup_init": False, "beta1": None}, extra
            assert {"lr", "eps", "clip_threshold", "decay_rate", "weight_decay", "scale_parameter"} <= shared
        else:
            assert set(hf_group) <= set(mine), (pname, set(hf_group) - set(mine))
        diff = {k: (hf_group[k], mine[k]) for k in shared if hf_group[k] != mine[k]}
        assert not diff, f"{name}: {pname}: hyperparameters (HF, lit_optim) differ: {diff}"
    # No-decay set: transformers' names vs the parameters lit_optim put in zero-decay groups.
    decay = set(_TrainerStandIn(hf_model, None).get_decay_parameter_names(hf_model))
    ours_no_decay = {n for n, g in our_groups.items() if g.get("weight_decay") == 0.0}
    if hf_groups[next(iter(decay))]["weight_decay"] != 0.0:
        assert ours_no_decay == set(hf_groups) - decay


def state_layout(optimizer, model) -> dict[str, dict]:
    """Per parameter: state keys, tensor kinds, dtypes, shapes (a quantized state's scale shape shows its blocks)."""
    def describe(v):
        if not torch.is_tensor(v):
            return type(v).__name__
        scale = getattr(v, "scale", None)
        return type(v).__name__, v.dtype, tuple(v.shape), None if scale is None else tuple(scale.shape)

    return {n: {k: describe(v) for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}


def assert_same_parameters(hf_model, ours_model):
    for (n, a), b in zip(hf_model.named_parameters(), ours_model.parameters()):
        scale = a.detach().abs().max().clamp_min(1e-12)
        err = (a.detach() - b.detach()).abs().max()
        assert err <= RTOL * scale, f"{n}: max |HF - lit_optim| = {err:.3g} ({err / scale:.3g} relative)"


def _skip_reason(name: str) -> str | None:
    key = _lowrank_key(name)
    if key:
        package = HF_NEEDS[key]
        if importlib.util.find_spec(package) is None:
            return f"transformers builds {name!r} with {package}, which is not installed here"
        return DELIBERATE["lomo" if key == "adalomo" else key]
    avail = availability(get_spec(name))
    if not avail.ok:
        return f"lit_optim cannot build {name!r} here: {avail.reason}"
    return None


# "name_and_lr": the lit_optim config a user writes by hand, {"name": ..., "lr": ...}, must default to what the Trainer
# builds from TrainingArguments' defaults (the spec defaults, not the classes').
GIVEN = {
    "name_and_lr": {"learning_rate": LR},
    "only_lr": {"learning_rate": LR},
    "all_set": {"learning_rate": 3e-3, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6,
                "weight_decay": 0.1},
}


@pytest.mark.parametrize("given", sorted(GIVEN))
@pytest.mark.parametrize("name", [_case(n) for n in HF_NAMES])
def test_builds_and_steps_what_the_trainer_builds(name, given, fresh_bnb_manager):
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    args = hf_args(name, **GIVEN[given])
    ours_cfg = {"name": name, "lr": LR} if given == "name_and_lr" else None
    (theirs, hf_model), (ours, ours_model), _ = build_both(args, ours_cfg)
    assert_same_optimizer(name, theirs, hf_model, ours, ours_model)
    if get_spec(name).embedding_state_32bit:
        assert ours.lit_optim.embedding_32bit_params == ours_model.embed.weight.numel()
    step_both([(theirs, hf_model), (ours, ours_model)])
    assert_same_parameters(hf_model, ours_model)
    if name not in SAME_ALGORITHM:  # two implementations of Adafactor name their state differently
        assert state_layout(ours, ours_model) == state_layout(theirs, hf_model)
    if get_spec(name).embedding_state_32bit:  # HF's override and lit_optim's keep the embedding's state 32-bit
        for opt, model in ((theirs, hf_model), (ours, ours_model)):
            assert opt.state[model.embed.weight]["state1"].dtype == torch.float32
            assert opt.state[model.up.weight]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("name, optim_args", [
    ("sgd", "momentum=0.9,dampening=0.1,nesterov=False"),
    ("sgd", "momentum=0.9, nesterov=True"),
    ("adagrad", "lr_decay=0.01,eps=1e-8"),
    ("rmsprop", "momentum=0.5,alpha=0.9,eps=1e-6,centered=True"),
    ("ademamix_8bit", "beta3=0.999,alpha=8.0,t_alpha=100,t_beta3=100"),
    ("schedule_free_adamw", "weight_lr_power=1.0,r=0.5"),
    ("schedule_free_sgd", "r=0.5"),
])
def test_optim_args_reach_the_optimizer_as_the_trainer_passes_them(name, optim_args, fresh_bnb_manager):
    args = hf_args(name, learning_rate=LR, weight_decay=0.05, optim_args=optim_args)
    (theirs, hf_model), (ours, ours_model), _ = build_both(args)
    assert_same_optimizer(name, theirs, hf_model, ours, ours_model)
    step_both([(theirs, hf_model), (ours, ours_model)])
    assert_same_parameters(hf_model, ours_model)


def test_warmup_steps_reach_schedule_free(fresh_bnb_manager):
    args = hf_args("schedule_free_adamw", learning_rate=LR, warmup_steps=3)
    (theirs, hf_model), (ours, ours_model), cfg = build_both(args)
    assert cfg["warmup_steps"] == 3
    assert_same_optimizer("schedule_free_adamw", theirs, hf_model, ours, ours_model)


def test_every_hf_name_is_tested_or_explained():
    """Each HF name either runs the parity test here, or is out of scope with a reason in lit_optim.hf_names."""
    assert set(HF_NAMES) | set(OUT_OF_SCOPE) == HF_TRAINER_NAMES
    for name in HF_NAMES:
        reason = _skip_reason(name)
        assert reason is None or "not installed" in reason or "cannot build" in reason or reason in DELIBERATE.values()


# --- from_hf_training_args on its own -------------------------------------------------------------------------------


def test_only_lr_gives_the_trainer_defaults():
    cfg = lit_optim.from_hf_training_args(hf_args("paged_lion_8bit", learning_rate=2e-5))
    assert cfg == {"name": "paged_lion_8bit", "lr": 2e-5, "weight_decay": 0.0, "betas": (0.9, 0.999)}
    cfg = lit_optim.from_hf_training_args(hf_args("adamw_torch_4bit", learning_rate=2e-5))
    assert cfg == {"name": "adamw_torch_4bit", "lr": 2e-5, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8,
                   "block_size": 256, "bf16_stochastic_round": False}
    cfg = lit_optim.from_hf_training_args(hf_args("adamw_torch_4bit", learning_rate=2e-5, optim_args="block_size=128"))
    assert cfg["block_size"] == 128  # an int: the Trainer itself would pass the string "128" on to torchao


def test_lowrank_names_map_targets_and_projection_settings():
    args = hf_args("galore_adamw_8bit", learning_rate=1e-2, optim_target_modules=["attn", "mlp"],
                   optim_args="rank=64,update_proj_gap=100,scale=0.5,proj_type=left")
    assert lit_optim.from_hf_training_args(args) == {
        "name": "galore_adamw_8bit", "lr": 1e-2, "weight_decay": 0.0, "target_modules": ["attn", "mlp"],
        "rank": 64, "update_proj_gap": 100, "scale": 0.5, "proj_type": "left"}
    cfg = lit_optim.from_hf_training_args(
        hf_args("apollo_adamw", learning_rate=1e-2, optim_target_modules="all-linear"))
    assert cfg["betas"] == (0.9, 0.999) and cfg["eps"] == 1e-8 and cfg["target_modules"] == "all-linear"
    with pytest.raises(HyperparameterError, match="optim_target_modules"):
        lit_optim.from_hf_training_args(hf_args("galore_adamw", learning_rate=1e-2))
    with pytest.raises(HyperparameterError, match="random"):
        lit_optim.from_hf_training_args(hf_args("apollo_adamw", learning_rate=1e-2, optim_target_modules="all-linear",
                                                optim_args="proj=svd"))


@pytest.mark.parametrize("name", sorted(OUT_OF_SCOPE))
def test_names_lit_optim_does_not_build_fail_clearly(name):
    with pytest.raises(HyperparameterError, match=f"optim={name!r} has no lit_optim equivalent") as err:
        lit_optim.from_hf_training_args(hf_args(name))
    assert OUT_OF_SCOPE[name] in str(err.value)  # the reason and the alternative


@pytest.mark.parametrize("optim, optim_args, match", [
    ("adam_mini", None, "not a Hugging Face Trainer optimizer name"),
    ("adamw_torch", "betas=0.9", r"not used by Hugging Face's Trainer for optim='adamw_torch'"),
    ("sgd", "momentum=fast", "momentum='fast'"),
    ("sgd", "momentum", "not key=value"),
    ("sgd", "nesterov=maybe", "not a boolean"),
])
def test_bad_arguments_are_refused(optim, optim_args, match):
    with pytest.raises(HyperparameterError, match=match):
        lit_optim.from_hf_training_args(hf_args(optim, optim_args=optim_args))


# --- the same with transformers' real objects: a TrainingArguments and a Trainer around a PreTrainedModel ----------
REAL = ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit", "adafactor", "sgd",
        "rmsprop", "schedule_free_adamw"]


@pytest.mark.parametrize("name", REAL)
def test_a_real_trainer_builds_what_lit_optim_builds(name, tmp_path, fresh_bnb_manager):
    """`TrainingArguments(...)` (which needs accelerate) and `Trainer.create_optimizer` on a real Llama: the stand-in
    above must not hide anything the real objects do."""
    pytest.importorskip("accelerate")
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(config)
    ours_model = LlamaForCausalLM(config)
    ours_model.load_state_dict(hf_model.state_dict())
    args = TrainingArguments(output_dir=str(tmp_path), optim=name, learning_rate=2e-3, weight_decay=0.05,
                             adam_beta1=0.85, adam_beta2=0.99, adam_epsilon=1e-7, report_to=[], use_cpu=True)
    theirs = Trainer(model=hf_model, args=args).create_optimizer()
    as_training(theirs)
    ours = lit_optim.build_optimizer(ours_model, **lit_optim.from_hf_training_args(args))
    assert_same_optimizer(name, theirs, hf_model, ours, ours_model)
