"""The registry: listing, describing, aliases, unknown names, and the Hugging Face Trainer `optim` strings.

For every HF name whose backend lit_optim wraps (torch, torchao, bitsandbytes, schedulefree, optimi), the object
lit_optim builds is compared with the one Hugging Face's Trainer builds for that string -- constructed here by hand
from the same class and arguments, stepped with the same gradients, and compared by class family, bits, paging and
the layout of the optimizer state.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import re
from dataclasses import replace

import pytest
import torch
from harness import temporary_spec
from torch import nn

import lit_optim
from lit_optim.errors import UnknownOptimizerError, UnsupportedOptimizerError
from lit_optim.hf_names import HF_TRAINER_NAMES, OUT_OF_SCOPE
from lit_optim.registry import aliases, all_specs, availability, get_spec, list_optimizers, register
from lit_optim.spec import CPU, OptimizerSpec

# The names the core issue promises (each must build, step, train and resume; see the per-name tests).
CORE_NAMES = {
    "adamw_torch", "adamw_torch_fused", "adam", "sgd", "adagrad", "rmsprop", "adafactor", "adafactor_torch", "muon",
    "adamw_torch_8bit", "adamw_torch_4bit", "adamw_fp8", "adam_torch_8bit", "adam_torch_4bit", "adam_fp8",
    "adamw_bnb_8bit", "adamw_32bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
    "paged_lion_8bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "ademamix",
    "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit", "adagrad_8bit", "sgd_8bit", "lamb_8bit",
    "schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd", "stable_adamw",
}

# What Hugging Face's Trainer (transformers' OptimizerNames) builds for each string whose backend lit_optim wraps:
# (class, constructor arguments that the string implies). bitsandbytes names all go through bnb's generic classes
# with optim_bits = 8 if "8bit" in the name else 32 and is_paged = "paged" in the name (RMSprop gets no is_paged).
BNB = "bitsandbytes.optim"
HF_BUILDS = {
    "adamw_torch": ("torch.optim:AdamW", {}),
    "adamw_torch_fused": ("torch.optim:AdamW", {"fused": True}),
    "sgd": ("torch.optim:SGD", {}),
    "adagrad": ("torch.optim:Adagrad", {}),
    "rmsprop": ("torch.optim:RMSprop", {}),
    "adamw_torch_8bit": ("torchao.optim:AdamW8bit", {}),
    "adamw_torch_4bit": ("torchao.optim:AdamW4bit", {"block_size": 256}),
    "adamw_bnb_8bit": (f"{BNB}:AdamW", {"optim_bits": 8, "is_paged": False}),
    "adamw_8bit": (f"{BNB}:AdamW", {"optim_bits": 8, "is_paged": False}),
    "paged_adamw_8bit": (f"{BNB}:AdamW", {"optim_bits": 8, "is_paged": True}),
    "paged_adamw_32bit": (f"{BNB}:AdamW", {"optim_bits": 32, "is_paged": True}),
    "lion_8bit": (f"{BNB}:Lion", {"optim_bits": 8, "is_paged": False}),
    "lion_32bit": (f"{BNB}:Lion", {"optim_bits": 32, "is_paged": False}),
    "paged_lion_8bit": (f"{BNB}:Lion", {"optim_bits": 8, "is_paged": True}),
    "paged_lion_32bit": (f"{BNB}:Lion", {"optim_bits": 32, "is_paged": True}),
    "ademamix": (f"{BNB}:AdEMAMix", {"optim_bits": 32, "is_paged": False}),
    "ademamix_8bit": (f"{BNB}:AdEMAMix", {"optim_bits": 8, "is_paged": False}),
    "paged_ademamix_8bit": (f"{BNB}:AdEMAMix", {"optim_bits": 8, "is_paged": True}),
    "paged_ademamix_32bit": (f"{BNB}:AdEMAMix", {"optim_bits": 32, "is_paged": True}),
    "rmsprop_bnb": (f"{BNB}:RMSprop", {"optim_bits": 32}),
    "rmsprop_bnb_8bit": (f"{BNB}:RMSprop", {"optim_bits": 8}),
    "rmsprop_bnb_32bit": (f"{BNB}:RMSprop", {"optim_bits": 32}),
    "schedule_free_adamw": ("schedulefree:AdamWScheduleFree", {}),
    "schedule_free_radam": ("schedulefree:RAdamScheduleFree", {}),
    "schedule_free_sgd": ("schedulefree:SGDScheduleFree", {}),
    "stable_adamw": ("optimi:StableAdamW", {}),
}
# transformers' own Adafactor is not one of lit_optim's backends; the name builds lit_optim's implementation of its
# update (tests/test_hf_parity.py steps the two side by side).
HF_OTHER_CLASS = {"adafactor": "lit_optim.optimizers.adafactor:Adafactor"}
LATER_ISSUE = re.compile(r"galore|apollo|lomo")  # GaLore, APOLLO, LOMO/AdaLomo: their own issue and tests


def load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


def family(cls: type) -> str:
    """bitsandbytes' class family without paging and bits: PagedAdamW8bit -> AdamW."""
    return re.sub(r"(8bit|32bit)$", "", cls.__name__.removeprefix("Paged"))


def state_layout(optimizer, params) -> list[dict]:
    return [{k: (v.dtype, tuple(v.shape)) if torch.is_tensor(v) else type(v).__name__
             for k, v in optimizer.state[p].items()} for p in params]


# --- listing, aliases, describe ----------------------------------------------------------------------------------


def test_list_optimizers_is_sorted_unique_and_covers_the_core_names():
    names = list_optimizers()
    assert names == sorted(set(names))
    assert CORE_NAMES <= set(names), CORE_NAMES - set(names)
    assert not set(names) & set(aliases()), "aliases are not listed as names"
    assert [s.name for s in all_specs()] and {s.name for s in all_specs()} == set(names)


@pytest.mark.parametrize("pattern", ["*8bit*", "paged_*", "adam*", "nothing_matches_*"])
def test_list_optimizers_pattern(pattern):
    got = list_optimizers(pattern)
    assert got == [n for n in list_optimizers() if fnmatch.fnmatch(n, pattern)]
    assert all(fnmatch.fnmatch(n, pattern) for n in got)
    if pattern == "*8bit*":
        assert {"adamw_bnb_8bit", "adamw_torch_8bit", "paged_lion_8bit"} <= set(got)
        assert "adamw_torch" not in got
    if pattern.startswith("nothing"):
        assert got == []


def test_aliases_resolve_to_their_spec():
    table = aliases()
    assert table["adamw_8bit"] == "adamw_bnb_8bit"
    assert table["paged_adamw"] == "paged_adamw_32bit"
    for alias, name in table.items():
        spec = get_spec(alias)
        assert spec is get_spec(name) and spec.name == name and alias in spec.aliases
    # Lookup ignores case and surrounding blanks.
    assert get_spec("  AdamW_8bit ") is get_spec("adamw_bnb_8bit")


@pytest.mark.parametrize("name", list_optimizers())
def test_describe(name):
    spec = get_spec(name)
    text = lit_optim.describe(name)
    assert text.startswith(f"{name}: {spec.description}")
    assert spec.target.replace(":", ".") in text
    assert f"backend:       {spec.backend}" in text
    assert f"{spec.bytes_per_param():.3g} bytes/param" in text
    for feature, why in spec.unsupported_why.items():  # the reason a strategy is refused, where one is refused
        assert (f"not {feature}:" in text and why in text) == (feature not in spec.supports), (feature, text)
    for alias in spec.aliases:
        assert alias in text
        assert lit_optim.describe(alias) == text
    gpu_only = spec.requires_cuda or CPU not in spec.supports
    assert ("CUDA only" in text) == gpu_only
    if gpu_only and not torch.cuda.is_available():
        assert "unavailable here: needs a CUDA GPU" in text
    if spec.min_compute_capability:
        assert f"compute capability >= {'.'.join(map(str, spec.min_compute_capability))}" in text
    hf = [n for n in spec.names if n in HF_TRAINER_NAMES]
    assert f"HF Trainer:    {', '.join(hf) or 'no'}" in text


def test_availability_on_this_machine():
    for spec in all_specs():
        avail = availability(spec)
        gpu_only = spec.requires_cuda or CPU not in spec.supports
        if gpu_only and not torch.cuda.is_available():
            assert not avail.ok and "CUDA" in avail.reason
        elif not gpu_only:
            assert avail.ok, (spec.name, avail.reason)  # every backend is installed in the test environment


def test_bytes_per_param_claims():
    """The headline numbers the table and describe() show, for a 4096 x 4096 weight."""
    bpp = {n: get_spec(n).bytes_per_param() for n in CORE_NAMES}
    for name in ("adamw_torch", "adamw_32bit", "paged_adamw_32bit", "adam", "stable_adamw", "schedule_free_adamw"):
        assert bpp[name] == 8.0
    for name in ("adamw_bnb_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adam_torch_8bit", "adamw_fp8"):
        assert 2.0 < bpp[name] < 2.04, (name, bpp[name])  # two 1-byte moments plus one fp32 scale per 256
    for name in ("adamw_torch_4bit", "adam_torch_4bit"):
        assert 1.0 < bpp[name] < 1.07, (name, bpp[name])  # two 4-bit moments plus one fp32 scale per 128
    assert bpp["lion_8bit"] < 1.02 and bpp["lion_32bit"] == 4.0
    assert bpp["ademamix_8bit"] < 3.05 and bpp["ademamix"] == 12.0
    assert bpp["sgd"] == 0.0 and get_spec("sgd").bytes_per_param({"momentum": 0.9}) == 4.0
    assert bpp["adafactor"] < 0.01 and bpp["adafactor_torch"] < 0.01  # factored: one row and one column vector
    assert bpp["muon"] == 4.0  # hidden 2-D weights: one momentum buffer


# --- unknown names and registration ------------------------------------------------------------------------------


@pytest.mark.parametrize("typo, suggestion", [
    ("adamw_torch_8bt", "adamw_torch_8bit"),
    ("adamw8bit", "adamw_8bit"),
    ("paged_adam_8bit", "paged_adamw_8bit"),
    ("lion8bit", "lion_8bit"),
    ("shedule_free_adamw", "schedule_free_adamw"),
])
def test_unknown_name_suggests_the_closest(typo, suggestion):
    with pytest.raises(UnknownOptimizerError) as err:
        get_spec(typo)
    assert suggestion in err.value.suggestions
    message = str(err.value)
    assert f"Unknown optimizer {typo!r}" in message and "Did you mean" in message and suggestion in message
    assert "lit-optim list" in message
    assert isinstance(err.value, KeyError) and isinstance(err.value, lit_optim.LitOptimError)


def test_unknown_name_with_nothing_close():
    with pytest.raises(UnknownOptimizerError) as err:
        get_spec("zzzz")
    assert err.value.suggestions == [] and "Did you mean" not in str(err.value)


def test_registering_a_taken_name_or_alias_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register(replace(get_spec("adamw_torch"), aliases=()))
    with pytest.raises(ValueError, match="registered twice"):
        register(replace(get_spec("adamw_torch"), name="test_fresh_name", aliases=("adamw_8bit",)))
    assert "test_fresh_name" not in list_optimizers()
    with pytest.raises(ValueError, match="unknown backend"):
        OptimizerSpec(name="x", backend="nope", target="torch.optim:SGD", description="", state_bytes=lambda s, h: 0)


def test_temporary_spec_is_listed_then_gone():
    spec = replace(get_spec("adamw_torch"), name="test_temporary", aliases=("test_temporary_alias",))
    with temporary_spec(spec):
        assert "test_temporary" in list_optimizers() and get_spec("test_temporary_alias") is spec
    assert "test_temporary" not in list_optimizers()
    with pytest.raises(UnknownOptimizerError):
        get_spec("test_temporary_alias")


# --- Hugging Face Trainer names ----------------------------------------------------------------------------------


def test_every_hf_name_is_accounted_for():
    assert len(HF_TRAINER_NAMES) == 41
    handled = set(HF_BUILDS) | set(HF_OTHER_CLASS) | set(OUT_OF_SCOPE)
    rest = HF_TRAINER_NAMES - handled
    assert all(LATER_ISSUE.search(n) for n in rest), sorted(n for n in rest if not LATER_ISSUE.search(n))
    assert set(OUT_OF_SCOPE) <= HF_TRAINER_NAMES


@pytest.mark.parametrize("hf_name", sorted(HF_TRAINER_NAMES))
def test_hf_name_builds_what_hf_builds(hf_name):
    if LATER_ISSUE.search(hf_name):
        pytest.skip("GaLore / APOLLO / LOMO names belong to a later issue and are tested there")
    if hf_name in OUT_OF_SCOPE:
        with pytest.raises(UnsupportedOptimizerError):
            get_spec(hf_name)
        return
    spec = get_spec(hf_name)
    if hf_name in HF_OTHER_CLASS:
        assert spec.target == HF_OTHER_CLASS[hf_name]
        assert "Hugging Face" in spec.notes  # the difference is documented where users look
        return
    target, kwargs = HF_BUILDS[hf_name]
    hf_cls = load(target)

    torch.manual_seed(0)
    ours_model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))  # 4096-element weights: low-bit state applies
    hf_model = copy.deepcopy(ours_model)
    runs = availability(spec).ok
    if runs:
        ours = lit_optim.build_optimizer(ours_model, hf_name, lr=1e-3)
    else:  # a GPU-only name on this machine: compare the object its class builds, without stepping it
        ours = spec.load_class()(ours_model.parameters(), lr=1e-3, **spec.fixed)
    # optimi takes its Triton step even for CPU tensors when Triton is installed (and Triton has no CPU driver):
    # lit_optim's builder keeps CPU parameters on its torch path; do the same for Hugging Face's object here.
    cpu_path = {"triton": False} if "triton" in inspect.signature(hf_cls).parameters else {}
    theirs = hf_cls(hf_model.parameters(), lr=1e-3, **kwargs, **cpu_path)

    if spec.backend == "bitsandbytes":
        assert family(type(ours)) == family(hf_cls), (type(ours).__name__, hf_cls.__name__)
        assert ours.optimizer_name == theirs.optimizer_name
        assert ours.args.optim_bits == theirs.args.optim_bits == kwargs["optim_bits"]
        assert bool(ours.is_paged) == bool(theirs.is_paged) == kwargs.get("is_paged", False)
        assert spec.bits == kwargs["optim_bits"] and spec.paged == kwargs.get("is_paged", False)
    else:
        assert type(ours) is hf_cls
        for key, value in kwargs.items():
            if key in ours.defaults:
                assert all(g[key] == value for g in ours.param_groups)
            else:  # torchao keeps block_size on the optimizer, not in its groups
                assert getattr(ours, key) == getattr(theirs, key) == value
    if not runs:
        return

    # Same gradients, one step each: the same state layout (keys, dtypes, shapes) for every tensor.
    x = torch.randn(8, 64)
    for model, opt in ((ours_model, ours), (hf_model, theirs)):
        if hasattr(opt, "train") and spec.train_eval_switch:
            opt.train()
        model(x).square().mean().backward()
        opt.step()
    assert state_layout(ours, list(ours_model.parameters())) == state_layout(theirs, list(hf_model.parameters()))


def test_describe_lists_what_a_name_takes_with_its_defaults():
    text = lit_optim.describe("adamw_torch_4bit")
    takes = text[text.index("  takes:"):]
    assert "    block_size = 256  -- elements per quantization block" in takes  # the name's default, not torchao's
    assert "    lr = " in takes and "    offload  -- " in takes
    fused = lit_optim.describe("adamw_torch_fused")
    assert "builds:        torch.optim.AdamW(fused=True)" in fused
    assert "    fused = " not in fused  # fixed by the name, not something to set


def test_describe_without_the_backend_says_how_to_install_it(monkeypatch):
    import lit_optim.description as describe_mod
    from lit_optim.registry import Availability

    monkeypatch.setattr(describe_mod, "availability", lambda spec: Availability(False, "not installed"))
    text = lit_optim.describe("stable_adamw")
    assert "takes:         (its backend is not installed here: pip install 'lit-optim[optimi]'" in text
