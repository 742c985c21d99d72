"""Every registry name builds, steps, and is what the name says: class, bits, paging, and state bytes within 1% of the
spec's theory. One test per name (parametrized over `lit_optim.list_optimizers()`); GPU-only names run on a GPU.

The model's shapes are the built-in task's (tests/harness.TINY_MODEL), so torchao's compiled step is reused by the
training tests instead of being compiled again for new shapes.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lit_optim
from lit_optim.spec import CPU
from lit_optim.state_bytes import leaf_tensors, state_bytes_by_param, state_tensors

MIN_LOW_BIT = 4096  # torchao and bitsandbytes quantize only tensors of at least this many elements
SCALAR_SLACK = 16  # bytes: per-parameter scalars (a `step` tensor, LAMB's update norm) the theory leaves out


class Net(nn.Module):
    """An embedding, a LayerNorm and an RMSNorm, biases, small and large Linear weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)  # 16384 elements
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 256)  # weight 16384, bias 256
        self.down = nn.Linear(256, 64)  # weight 16384 (the large tensor compared with theory), bias 64
        self.gate = nn.Linear(64, 32, bias=False)  # 2048 elements: a small 2-D weight
        self.out_norm = nn.RMSNorm(64)
        self.head = nn.Linear(64, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        h = h + self.down(F.gelu(self.up(h)))
        h = h + self.gate(h).repeat(1, 1, 2)
        return self.head(self.out_norm(h))


def gpu_only(name: str) -> bool:
    spec = lit_optim.get_spec(name)
    return spec.requires_cuda or CPU not in spec.supports


def per_name(names):
    return [pytest.param(n, marks=pytest.mark.gpu) if gpu_only(n) else n for n in names]


ALL = lit_optim.list_optimizers()
# Schedule-free RAdam's default "silent SGD phase" leaves the parameters untouched for its first 4 steps.
STEP_HP = {"schedule_free_radam": {"silent_sgd_phase": False}}
# bitsandbytes' own 8-bit names (the projections around them are checked in test_galore.py).
BNB_8BIT_EMBEDDING = [n for n in ALL if lit_optim.get_spec(n).backend == "bitsandbytes"
                      and lit_optim.get_spec(n).embedding_state_32bit]


def leaves(optimizer, p) -> list[torch.Tensor]:
    return [leaf for v in optimizer.state.get(p, {}).values() for t in state_tensors(v) for leaf in leaf_tensors(t)]


def quantized(optimizer, p) -> bool:
    """State of `p` holds low-bit codes (a 1-byte tensor larger than a scalar)."""
    return any(t.element_size() == 1 and t.numel() > 1 for t in leaves(optimizer, p))


def exclusive_bytes(optimizer, p) -> int:
    """`p`'s state bytes minus storages other parameters' states share (bitsandbytes' quantization maps)."""
    key = lambda t: (t.device.type, t.untyped_storage().data_ptr())  # noqa: E731
    others = {key(t) for q in optimizer.state if q is not p for t in leaves(optimizer, q)}
    mine = {key(t): t.untyped_storage().nbytes() for t in leaves(optimizer, p)}
    return sum(n for k, n in mine.items() if k not in others)


def build_and_step(name: str, steps: int = 2, **hp):
    device = "cuda" if gpu_only(name) else "cpu"
    torch.manual_seed(0)
    model = Net().to(device)
    opt = lit_optim.build_optimizer(model, name, **{"lr": 1e-3, **hp})
    if opt.lit_optim.spec.train_eval_switch:
        # Built in train mode (schedule-free refuses to step in eval mode), with no empty state entries: DCP's
        # state init before a resume needs both (lit_optim.schedule_free).
        assert all(g["train_mode"] for g in opt.param_groups) and not opt.state
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, 256, (4, 16), device=device)
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    stuck = [n for b, (n, p) in zip(before, model.named_parameters()) if torch.equal(b, p.detach())]
    return model, opt, stuck


@pytest.mark.parametrize("name", per_name(ALL))
def test_name_builds_steps_and_is_what_it_says(name):
    spec = lit_optim.get_spec(name)
    model, opt, stuck = build_and_step(name, **STEP_HP.get(name, {}))

    # The class the name claims, and the arguments the name fixes.
    assert type(opt) is spec.load_class(), f"{name} built {type(opt).__name__}"
    assert opt.lit_optim.spec is spec
    for key, value in spec.fixed.items():
        if key == "optim_bits":
            assert opt.args.optim_bits == value
        else:
            assert all(g[key] == value for g in opt.param_groups), (key, value)
    if spec.backend == "bitsandbytes":
        assert opt.args.optim_bits == spec.bits
        assert bool(opt.is_paged) == spec.paged
    else:
        assert not spec.paged
    # Every parameter moves in 2 steps -- except that bitsandbytes' LAMB scales each update by the trust ratio
    # |w| / |update| with no fallback for |w| = 0, so zero-initialised tensors (LayerNorm's bias) never move.
    assert stuck == (["norm.bias"] if name == "lamb_8bit" else []), f"{name}: parameters that did not move: {stuck}"

    hp = opt.lit_optim.hyperparameters
    measured = state_bytes_by_param(opt)

    # A large tensor (not the first quantized one, which carries bitsandbytes' shared maps): measured vs theory.
    big = model.down.weight
    theory = spec.state_bytes(tuple(big.shape), hp)
    if theory == 0:
        assert measured[big] == 0, f"{name} claims no state but keeps {measured[big]} bytes"
    else:
        assert abs(measured[big] - theory) <= 0.01 * theory, (name, measured[big], theory)
    if spec.bits is not None and spec.bits < 32:
        assert quantized(opt, big), f"{name}: the {big.numel()}-element weight did not get low-bit state"

    # Small tensors (< 4096 elements) keep full-precision state, as the theory says -- except in lit_optim's fused
    # optimizers, which quantize every tensor alike (so a shard never changes its parameter's precision), and in
    # FlashOptim's, which quantize every tensor whatever its size.
    small = [p for p in model.parameters() if p.numel() < MIN_LOW_BIT]
    assert {p.ndim for p in small} == {1, 2}  # biases and norms, and the small 2-D gate weight
    if spec.target.startswith("lit_optim.optimizers.lowbit:") or spec.backend == "flashoptim":
        for p in small:
            assert quantized(opt, p), f"{name}: a {tuple(p.shape)} tensor kept full-precision state"
            assert 0 <= measured[p] - spec.state_bytes(tuple(p.shape), hp) <= SCALAR_SLACK, (name, p.shape, measured[p])
        small = []
    for p in small:
        assert not quantized(opt, p), f"{name}: a {tuple(p.shape)} tensor got low-bit state"
        full = [t for t in leaves(opt, p) if t.numel() == p.numel()]
        assert all(t.dtype == torch.float32 for t in full), [t.dtype for t in full]
        expected = spec.state_bytes(tuple(p.shape), hp)
        assert abs(measured[p] - expected) <= 0.01 * expected + SCALAR_SLACK, (name, tuple(p.shape), measured[p])

    # Its state dict holds only what `torch.load(weights_only=True)` reads in any process: no class to register
    # first (torchao's state subclasses go in as plain tensors: lit_optim/plain_state.py).
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(saved) == [], name


@pytest.mark.parametrize("name", per_name(BNB_8BIT_EMBEDDING))
def test_bnb_8bit_embedding_state(name):
    spec = lit_optim.get_spec(name)
    shape = (256, 64)

    # Default: as Hugging Face does, embeddings keep 32-bit state; other large weights are 8-bit.
    model, opt, _ = build_and_step(name, steps=1)
    hp = opt.lit_optim.hyperparameters
    emb = model.embed.weight
    assert opt.lit_optim.embedding_32bit_params == emb.numel()
    assert not quantized(opt, emb)
    assert all(t.dtype == torch.float32 for t in leaves(opt, emb) if t.numel() == emb.numel())
    fp32_theory = spec.state_bytes(shape, {**hp, "min_8bit_size": math.inf})
    assert abs(state_bytes_by_param(opt)[emb] - fp32_theory) <= 0.01 * fp32_theory
    assert quantized(opt, model.head.weight)

    # embedding_state_32bit=False: the embedding is quantized like any other large weight.
    model, opt, _ = build_and_step(name, steps=1, embedding_state_32bit=False)
    emb = model.embed.weight
    assert opt.lit_optim.embedding_32bit_params == 0
    assert quantized(opt, emb)
    theory = spec.state_bytes(shape, opt.lit_optim.hyperparameters)
    assert abs(exclusive_bytes(opt, emb) - theory) <= 0.01 * theory


def test_bnb_embedding_override_does_not_leak_into_later_optimizers():
    """bitsandbytes' override manager is process-wide and keyed by (group, index); lit_optim keeps it per optimizer."""
    build_and_step("adamw_bnb_8bit", steps=1)  # registers the 32-bit override for an embedding at group 0, index 0

    # A later model whose first tensor is a plain Linear weight of 4096 elements must get 8-bit state.
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    opt = lit_optim.build_optimizer(linear, "adamw_bnb_8bit", lr=1e-3)
    linear(torch.randn(2, 64)).square().mean().backward()
    opt.step()
    assert quantized(opt, linear[0].weight) and quantized(opt, linear[1].weight)

    # And a later model asking for 8-bit embeddings gets them.
    model, opt, _ = build_and_step("adamw_bnb_8bit", steps=1, embedding_state_32bit=False)
    assert quantized(opt, model.embed.weight)


def test_muon_splits_hidden_weights_from_embedding_and_head():
    """Muon keeps one momentum buffer for hidden 2-D weights (the spec's theory); the embedding, the head and 1-D
    parameters go to AdamW and keep two fp32 moments each -- which the shape-only theory cannot tell apart."""
    model, opt, _ = build_and_step("muon")
    spec = lit_optim.get_spec("muon")
    measured = state_bytes_by_param(opt)
    for hidden in (model.up.weight, model.down.weight, model.gate.weight):
        theory = spec.state_bytes(tuple(hidden.shape), {})
        assert abs(measured[hidden] - theory) <= 0.01 * theory + SCALAR_SLACK
        assert abs(measured[hidden] - 4 * hidden.numel()) <= SCALAR_SLACK
    for adamw in (model.embed.weight, model.head.weight, model.up.bias, model.norm.weight):
        assert abs(measured[adamw] - 8 * adamw.numel()) <= SCALAR_SLACK
    kinds = {g["name"]: g["kind"] for g in opt.param_groups}
    assert kinds == {"decay/muon": "muon", "decay/adamw": "adamw", "no_decay/adamw": "adamw"}
