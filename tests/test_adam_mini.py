"""Adam-mini: one second moment per Hessian block -- per head for query/key, per output neuron for value/attention
output/MLP, per token for embedding and head, per tensor for 1-D -- inferred from lit_optim's TinyLM and from
transformers' Llama, or given; missing dimensions are an error that names them, before step 1."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from harness import TINY_MODEL
from lowrank_support import assert_trains_and_resumes, fit_must_fail
from torch import nn

import lit_optim
from lit_optim.errors import HyperparameterError
from lit_optim.mixin import OptimizerMixin
from lit_optim.optimizers.adam_mini import AdamMini
from lit_optim.state_bytes import state_bytes_by_param
from lit_optim.task.tiny_lm import TinyLM

D, H, VOCAB = TINY_MODEL["d_model"], TINY_MODEL["n_heads"], TINY_MODEL["vocab_size"]


def tiny() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(**{k: v for k, v in TINY_MODEL.items() if k != "arch"})


def blocks_by_name(opt: AdamMini, model: nn.Module) -> dict[str, int]:
    return {n: opt.partition(p).blocks for n, p in model.named_parameters()}


def test_adam_mini_trains_resumes_and_keeps_about_half_of_adamw(tmp_path):
    t1, _, _ = assert_trains_and_resumes({"name": "adam_mini", "lr": 1e-2}, tmp_path)
    opt = t1.optimizers[0]
    assert isinstance(opt, AdamMini)
    spec, hp = lit_optim.get_spec("adam_mini"), opt.lit_optim.hyperparameters
    measured = state_bytes_by_param(opt)
    for p, got in measured.items():
        blocks = opt.partition(p).blocks
        assert got == 4 * p.numel() + 4 * blocks  # first moment per element + one value per block
        theory = spec.state_bytes(tuple(p.shape), hp)
        assert got <= theory and theory - got == 4 * (p.shape[0] - blocks if p.ndim == 2 else 0)
    total, n = sum(measured.values()), sum(p.numel() for p in measured)
    assert 4 * n < total < 4.1 * n  # ~half of AdamW's 8 bytes/param


def test_tiny_lm_partition_per_head_neuron_token_and_tensor():
    model = tiny()
    opt = lit_optim.build_optimizer(model, "adam_mini", lr=1e-3)
    blocks = blocks_by_name(opt, model)
    assert blocks["blocks.0.qkv.weight"] == H + H + D  # q: per head, k: per head, v: per output neuron
    assert opt.partition(model.blocks[0].qkv.weight).segments == ((D, D // H), (D, D // H), (D, 1))
    assert blocks["blocks.0.proj.weight"] == D and blocks["blocks.0.up.weight"] == 4 * D
    assert blocks["blocks.0.down.weight"] == D
    assert blocks["embed.weight"] == VOCAB and blocks["lm_head.weight"] == VOCAB  # per token
    assert blocks["blocks.0.attn_norm.weight"] == 1 and blocks["blocks.0.up.bias"] == 1  # per tensor
    # Given dimensions override the model's: 4 heads instead of Block.n_heads = 2.
    opt4 = lit_optim.build_optimizer(model, "adam_mini", n_heads=4)
    assert opt4.partition(model.blocks[0].qkv.weight).blocks == 4 + 4 + D


def test_one_step_is_adam_with_the_block_mean_second_moment():
    model = tiny()
    opt = lit_optim.build_optimizer(model, "adam_mini", lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    w = model.blocks[0].qkv.weight
    w0 = w.detach().clone()
    tokens = torch.randint(0, VOCAB, (4, 17))
    F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
    g = w.grad.clone()
    opt.step()
    hd = D // H
    v = torch.cat([g[:D].reshape(H, -1).square().mean(1).repeat_interleave(hd),
                   g[D:2 * D].reshape(H, -1).square().mean(1).repeat_interleave(hd),
                   g[2 * D:].square().mean(1)])
    # Step 1 with bias correction: m_hat = g, v_hat = block mean of g^2.
    assert torch.allclose(w - w0, -0.1 * g / (v.sqrt().unsqueeze(1) + 1e-8), atol=1e-6)


class Attention(nn.Module):  # q/k/v projections, no head count anywhere
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(32, 32, bias=False) for _ in range(3))
        self.lm_head = nn.Linear(32, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / 32**0.5, -1)
        return self.lm_head(att @ self.v_proj(x))


class AttentionTask(OptimizerMixin, L.LightningModule):
    def __init__(self, optim) -> None:
        super().__init__(optim=optim)
        self.model = Attention()

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def test_missing_head_count_is_an_error_naming_it_before_step_1(tmp_path):
    info = fit_must_fail(None, HyperparameterError, tmp_path, module=AttentionTask({"name": "adam_mini"}))
    message = str(info.value)
    assert "q_proj.weight" in message and "n_heads" in message and "n_kv_heads" in message
    # Given, it builds: 4 heads of 8 rows for q and k, one block per row for v.
    model = Attention()
    opt = lit_optim.build_optimizer(model, "adam_mini", n_heads=4)
    assert [opt.partition(p).blocks for p in (model.q_proj.weight, model.k_proj.weight, model.v_proj.weight)] == [
        4, 4, 32]
    with pytest.raises(HyperparameterError, match="do not split into heads"):
        lit_optim.build_optimizer(model, "adam_mini", n_heads=5)


LLAMA = {"arch": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def test_llama_partition_from_its_config_and_training(tmp_path):
    pytest.importorskip("transformers")
    from lit_optim.task.models import build_model

    model = build_model(LLAMA)
    opt = lit_optim.build_optimizer(model, "adam_mini")
    blocks = blocks_by_name(opt, model)
    attn = "model.layers.0.self_attn"
    assert blocks[f"{attn}.q_proj.weight"] == 4  # 4 query heads of 16 rows
    assert blocks[f"{attn}.k_proj.weight"] == 2  # grouped-query attention: 2 key heads
    assert opt.partition(model.model.layers[0].self_attn.k_proj.weight).segments == ((32, 16),)
    assert blocks[f"{attn}.v_proj.weight"] == 32 and blocks[f"{attn}.o_proj.weight"] == 64
    assert blocks["model.layers.0.mlp.gate_proj.weight"] == 128 and blocks["model.layers.0.mlp.down_proj.weight"] == 64
    assert blocks["model.embed_tokens.weight"] == VOCAB and blocks["lm_head.weight"] == VOCAB
    assert blocks["model.norm.weight"] == 1
    assert_trains_and_resumes({"name": "adam_mini", "lr": 1e-2}, tmp_path, model=LLAMA, steps=8, drop=0.2)


class NanoGPTAttention(nn.Module):
    """nanoGPT's layout: one `c_attn` Linear holding [q; k; v], the head count on the attention module."""

    def __init__(self, d: int = 64, n_head: int = 4) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)


class NeoXAttention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.query_key_value = nn.Linear(d, 3 * d)


class OddAttention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.n_heads = heads
        self.packed = nn.Linear(d, 3 * d)


def test_nanogpt_fused_c_attn_gets_a_block_per_query_and_key_head():
    model = nn.ModuleDict({"attn": NanoGPTAttention()})
    opt = lit_optim.build_optimizer(model, "adam_mini")
    part = opt.partition(model["attn"].c_attn.weight)
    # 4 query heads + 4 key heads of 16 rows each, then one block per value row.
    assert part.kind == "qkv" and part.segments == ((64, 16), (64, 16), (64, 1)) and part.blocks == 8 + 64
    assert opt.partition(model["attn"].c_proj.weight).blocks == 64


def test_multihead_attention_and_interleaved_layouts():
    mha = nn.ModuleDict({"attn": nn.MultiheadAttention(64, 4)})
    opt = lit_optim.build_optimizer(mha, "adam_mini")
    assert opt.partition(mha["attn"].in_proj_weight).segments == ((64, 16), (64, 16), (64, 1))
    neox = nn.ModuleDict({"attn": NeoXAttention()})
    opt = lit_optim.build_optimizer(neox, "adam_mini")
    part = opt.partition(neox["attn"].query_key_value.weight)
    assert part.segments == ((16, 16), (16, 16), (16, 1)) * 4 and part.blocks == 4 * (2 + 16)


def test_an_unknown_fused_layout_is_warned_about_and_can_be_named():
    model = nn.ModuleDict({"attn": OddAttention()})
    with pytest.warns(UserWarning, match=r"fused_qkv=\['packed'\]"):
        opt = lit_optim.build_optimizer(model, "adam_mini")
    assert opt.partition(model["attn"].packed.weight).blocks == 192  # one block per row, as warned
    opt = lit_optim.build_optimizer(model, "adam_mini", fused_qkv=["packed"])
    assert opt.partition(model["attn"].packed.weight).segments == ((64, 16), (64, 16), (64, 1))
