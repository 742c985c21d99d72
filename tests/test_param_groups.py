"""Param groups: which parameters get weight decay, which are left out, named groups and per-group LR scales.

Norm parameters here are 2-D (``nn.LayerNorm((4, 16))``) wherever possible, so that the module-type and name rules
are tested on their own rather than through the "every 1-D parameter" rule.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.errors import HyperparameterError
from lit_optim.param_groups import classify


class Holder(nn.Module):
    """A plain module (not a norm by type) holding one 2-D parameter called `weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16))


class ScaleNorm(nn.Module):
    """A user-defined norm: recognised by its class name, with a 2-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4, 16))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(16, 16)  # weight decays, bias does not
        self.ln_1 = Holder()  # GPT-2 style name "ln_1.weight"


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.pos_embed = nn.Parameter(torch.zeros(8, 16))  # listed in no_weight_decay()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.memory = nn.Linear(16, 16, bias=False)  # listed in no_weight_decay() by module prefix
        # Norms by module type (2-D parameters, names that match no name rule):
        self.pre = nn.LayerNorm((4, 16))
        self.post = nn.RMSNorm((4, 16))
        self.custom = ScaleNorm()
        self.bn = nn.BatchNorm1d(16)
        self.gn = nn.GroupNorm(4, 16)
        # Norms by name only (2-D parameters in plain modules):
        self.final_layernorm = Holder()
        self.q_rmsnorm = Holder()
        self.norm = Holder()
        self.encoder_norm = Holder()
        # Other 1-D and 0-D parameters:
        self.temperature = nn.Parameter(torch.ones(16))
        self.alpha = nn.Parameter(torch.tensor(1.0))
        # Names that look a little like norms but are not:
        self.enormous = nn.Linear(16, 16, bias=False)
        self.normalizer_proj = nn.Linear(16, 16, bias=False)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.lm_head = nn.Linear(16, 32, bias=False)

    def no_weight_decay(self):
        return {"pos_embed", "memory"}


DECAY = {
    "embed.weight", "blocks.0.attn.weight", "blocks.1.attn.weight", "enormous.weight", "normalizer_proj.weight",
    "lm_head.weight",
}
NO_DECAY = {
    "pos_embed", "memory.weight",  # no_weight_decay()
    "blocks.0.attn.bias", "blocks.1.attn.bias",  # biases
    "blocks.0.ln_1.weight", "blocks.1.ln_1.weight",  # ln_* names
    "pre.weight", "pre.bias", "post.weight", "custom.gain",  # norm modules by type / class name, 2-D
    "bn.weight", "bn.bias", "gn.weight", "gn.bias",
    "final_layernorm.weight", "q_rmsnorm.weight", "norm.weight", "encoder_norm.weight",  # by name, 2-D
    "temperature", "alpha",  # other 1-D / 0-D
}
FROZEN = {"frozen.weight", "frozen.bias"}


def group_names(optimizer) -> dict[str, set[str]]:
    info = optimizer.lit_optim
    return {g["name"]: set(info.plan.names(g)) for g in optimizer.param_groups}


def test_decay_rules_by_type_name_dimension_and_model_list():
    model = Model()
    assert all(p.ndim == 2 for n, p in model.named_parameters() if n in {
        "pre.weight", "post.weight", "custom.gain", "final_layernorm.weight", "q_rmsnorm.weight", "norm.weight",
        "encoder_norm.weight", "blocks.0.ln_1.weight", "pos_embed", "memory.weight"})
    infos, frozen, _ = classify(model)
    decided = {i.name: i.decay for i in infos}
    assert {n for n, d in decided.items() if d} == DECAY
    assert {n for n, d in decided.items() if not d} == NO_DECAY
    assert set(frozen) == FROZEN
    by_name = {i.name: i for i in infos}
    assert by_name["embed.weight"].is_embedding and by_name["lm_head.weight"].is_head
    assert by_name["pre.weight"].module_type == "LayerNorm" and by_name["post.weight"].module_type == "RMSNorm"


def test_optimizer_groups_weight_decay_and_frozen_params():
    model = Model()
    opt = lit_optim.build_optimizer(model, "adamw_torch", lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay"}
    assert group_names(opt) == {"decay": DECAY, "no_decay": NO_DECAY}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    # Every trainable parameter exactly once; frozen ones nowhere.
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(DECAY) + len(NO_DECAY)
    assert not any(p is model.frozen.weight or p is model.frozen.bias for p in in_groups)
    assert set(opt.lit_optim.plan.frozen) == FROZEN


def test_default_weight_decay_is_the_names_else_the_optimizers_own():
    opt = lit_optim.build_optimizer(Model(), "adamw_torch")  # a Hugging Face name: TrainingArguments' 0.0, not 0.01
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.0, "no_decay": 0.0}
    opt = lit_optim.build_optimizer(Model(), "adamw_32bit")  # lit_optim's own name: bitsandbytes AdamW's 0.01
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.01, "no_decay": 0.0}
    opt = lit_optim.build_optimizer(Model(), "adam")  # torch Adam's default is 0
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}


@pytest.mark.parametrize("name", ["adamw_torch_8bit", "adamw_bnb_8bit", "lion_32bit", "schedule_free_adamw"])
def test_groups_reach_every_backend(name):
    opt = lit_optim.build_optimizer(Model(), name, lr=2e-3, weight_decay=0.05, lr_scales={"embedding": 0.5})
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "embedding/decay"}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["embedding/decay"]["weight_decay"] == 0.05
    lr = {k: float(g["lr"]) for k, g in groups.items()}  # torchao keeps a tensor
    assert lr["decay"] == pytest.approx(2e-3) and lr["embedding/decay"] == pytest.approx(1e-3)


def test_lr_scales_make_named_scaled_groups():
    model = Model()
    opt = lit_optim.build_optimizer(
        model, "adamw_torch", lr=1e-3, weight_decay=0.1,
        lr_scales={"embedding": 0.1, "head": 2.0, r"^blocks\.0\.": 0.5},
    )
    names = group_names(opt)
    groups = {g["name"]: g for g in opt.param_groups}
    assert names["embedding/decay"] == {"embed.weight"}
    assert names["head/decay"] == {"lm_head.weight"}
    assert names[r"^blocks\.0\./decay"] == {"blocks.0.attn.weight"}
    assert names[r"^blocks\.0\./no_decay"] == {"blocks.0.attn.bias", "blocks.0.ln_1.weight"}
    assert names["decay"] == DECAY - {"embed.weight", "lm_head.weight", "blocks.0.attn.weight"}
    expected = {"embedding/decay": (0.1, 0.1), "head/decay": (2.0, 0.1), r"^blocks\.0\./decay": (0.5, 0.1),
                r"^blocks\.0\./no_decay": (0.5, 0.0), "decay": (1.0, 0.1), "no_decay": (1.0, 0.0)}
    assert set(groups) == set(expected)
    for name, (scale, wd) in expected.items():
        assert groups[name]["lr"] == pytest.approx(1e-3 * scale)
        assert groups[name]["lr_scale"] == scale
        assert groups[name]["weight_decay"] == wd
    assert sum(len(g["params"]) for g in opt.param_groups) == len(DECAY) + len(NO_DECAY)


def test_extra_no_decay_patterns():
    opt = lit_optim.build_optimizer(Model(), "adamw_torch", weight_decay=0.1, no_decay=[r"^enormous\."])
    names = group_names(opt)
    assert "enormous.weight" in names["no_decay"] and "enormous.weight" not in names["decay"]


def test_named_parameters_without_a_module():
    """(name, param) pairs: no module types, so the name and dimension rules decide; 'embed' names are embeddings."""
    model = Model()
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = lit_optim.build_optimizer(pairs, "adamw_torch", weight_decay=0.1, lr_scales={"embedding": 0.1})
    names = group_names(opt)
    # Without module types, the 2-D LayerNorm/RMSNorm/ScaleNorm weights under neutral names now decay...
    assert {"pre.weight", "post.weight", "custom.gain"} <= names["decay"]
    # ...while name-matched norms, biases and 1-D parameters still do not.
    assert {"final_layernorm.weight", "q_rmsnorm.weight", "norm.weight", "encoder_norm.weight", "temperature",
            "blocks.0.attn.bias", "blocks.0.ln_1.weight"} <= names["no_decay"]
    # Without the model there is no no_weight_decay() list; 'embed' in a name marks an embedding.
    assert names["embedding/decay"] == {"embed.weight", "pos_embed"}
    assert "memory.weight" in names["decay"]
    with pytest.raises(HyperparameterError, match="needs an nn.Module or \\(name, parameter\\) pairs"):
        lit_optim.build_optimizer(model.parameters(), "adamw_torch")


def test_errors_in_group_options():
    with pytest.raises(HyperparameterError, match=r"lr_scales selectors \['nothing_here'\] match no trainable"):
        lit_optim.build_optimizer(Model(), "adamw_torch", lr_scales={"nothing_here": 0.5})
    with pytest.raises(HyperparameterError, match="must be a non-negative finite number"):
        lit_optim.build_optimizer(Model(), "adamw_torch", lr_scales={"embedding": "x"})
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(HyperparameterError, match="no trainable parameters"):
        lit_optim.build_optimizer(frozen, "adamw_torch")


def test_the_user_is_told_once_where_parameters_went(caplog):
    model = Model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with caplog.at_level(logging.INFO, logger="lit_optim"):
        opt = lit_optim.build_optimizer(model, "adamw_torch", lr_scales={"embedding": 0.1})
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_optim"]
    assert len(lines) == 1
    line = lines[0]
    assert f"{trainable:,} trainable params in 3 groups" in line
    decay = sum(p.numel() for g in opt.param_groups if g["name"] == "decay" for p in g["params"])
    assert f"decay: {decay:,} params in {len(DECAY) - 1} tensors" in line
    assert "embedding/decay: 512 params in 1 tensors (lr x0.1)" in line
    assert "2 frozen tensors excluded" in line
    record = opt.lit_optim.record()
    assert record["trainable_params"] == trainable
    assert {g["name"]: g["tensors"] for g in record["groups"]} == {
        "embedding/decay": 1, "decay": len(DECAY) - 1, "no_decay": len(NO_DECAY)}
