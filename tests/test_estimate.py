"""`lit-optim estimate`: optimizer state exactly as built optimizers keep it, and the device peak within 10% of every
configuration measured on a GPU (benchmarks/results/big_models_h100_run{2,3}_*.json), predicted on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lit_optim
from lit_optim.memory_estimate import GIB, estimate, estimate_run
from lit_optim.state_bytes import state_bytes_by_param
from lit_optim.task.tiny_lm import TinyLM

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def recorded_rows() -> list[dict]:
    rows, seen = [], set()
    for path in sorted([*RESULTS.glob("big_models_h100_run2_*.json"), *RESULTS.glob("big_models_h100_run3_*.json")]):
        for row in json.loads(path.read_text())["rows"]:
            key = tuple(o for o in row["overrides"] if not o.startswith(("trainer.max_steps", "callbacks.")))
            if row["exit"] == 0 and row.get("peak_gib") and key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


ROWS = recorded_rows()


def test_the_gpu_record_is_there():
    assert len(ROWS) >= 10


@pytest.mark.parametrize("row", ROWS, ids=[r["label"] for r in ROWS])
def test_estimate_is_within_10_percent_of_the_measured_peak(row):
    pytest.importorskip("transformers")
    (est,), _ = estimate_run(row["overrides"])
    assert est.error is None, est.error
    measured = row["peak_gib"]
    assert abs(est.peak_device / GIB - measured) <= 0.10 * measured, (est.row(), measured)
    if row.get("managed_gib"):
        assert abs(est.state_managed / GIB - row["managed_gib"]) <= 0.05 * row["managed_gib"]


NAMES = ["adamw_torch", "sgd", "adamw_8bit", "adafactor", "adam_mini", "galore_adamw_8bit",
         "galore_adamw_layerwise", "apollo_mini", "adamw_fused_8bit", "adamw_fused_4bit", "lion_fused_8bit"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_equal_what_the_built_optimizer_keeps(name, dtype):
    hp = {"momentum": 0.9} if name == "sgd" else {"rank": 16} if "galore" in name or "apollo" in name else {}
    torch.manual_seed(0)
    model = TinyLM(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32).to(dtype)
    (est,) = estimate(model, [{"name": name, **hp}])
    opt = lit_optim.build_optimizer(model, name, **hp)
    tokens = torch.randint(0, 256, (2, 17))
    if "layerwise" in name:
        with opt.stepping():
            torch.nn.functional.cross_entropy(model(tokens[:, :-1]).float().reshape(-1, 256),
                                              tokens[:, 1:].reshape(-1)).backward()
    else:
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).float().reshape(-1, 256),
                                          tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    measured = sum(state_bytes_by_param(opt).values())
    predicted = est.state_device + est.state_managed + est.state_host
    slack = 16 * sum(1 for _ in model.parameters()) + 2 * 256 * 4 * 64  # step scalars; bitsandbytes' shared maps
    assert abs(measured - predicted) <= 0.01 * predicted + slack, (measured, predicted)


def test_where_the_state_lives_and_what_offload_and_in_backward_change():
    model = TinyLM(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    plain, paged, offloaded, layerwise = estimate(model, [
        "adamw_torch", "paged_adamw_32bit", {"name": "adamw_torch", "offload": "cpu", "offload_gradients": True},
        {"name": "galore_adamw_layerwise", "rank": 16}])
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert plain.weights == plain.gradients == weights and plain.state_device == pytest.approx(2 * weights)
    assert plain.step_temporaries == weights  # foreach AdamW's denominator
    assert paged.state_device == 0 and paged.state_managed == pytest.approx(2 * weights)
    assert offloaded.state_device == 0 and offloaded.state_host == pytest.approx(2 * weights)
    assert offloaded.gradients == max(p.numel() * 4 for p in model.parameters()) < weights
    assert layerwise.gradients == offloaded.gradients and layerwise.state_device < plain.state_device


def test_a_refused_name_is_a_row_with_its_reason():
    model = TinyLM(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    (est,) = estimate(model, [{"name": "adamw_torch", "lr": -1}])
    assert est.error and "learning rate must be >= 0" in est.error


def test_cli_prints_the_table_and_what_fits(capsys):
    from lit_optim.cli import main

    assert main(["estimate", "optim=adamw_torch,paged_adamw_8bit,adamw_8bit", "--budget-gib", "0.025"]) == 0
    out = capsys.readouterr().out
    assert "| adamw_torch |" in out and "peak device MiB" in out
    assert "Fits 0.025 GiB with the most optimizer state: paged_adamw_8bit" in out


def test_fsdp2_shards_weights_gradients_and_state_and_adds_what_it_gathers():
    model = TinyLM(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    (whole,) = estimate(model, ["adamw_torch"])
    sharded, refused, in_backward = estimate(model, ["adamw_torch", "adamw_8bit",
                                                     {"name": "adamw_torch", "in_backward": True}], shards=4)
    assert "'adamw_torch' in backward cannot be sharded with FSDP2" in in_backward.error
    for part in ("weights", "gradients", "state_device", "step_temporaries"):
        assert getattr(sharded, part) == pytest.approx(getattr(whole, part) / 4), part
    assert sharded.activations == whole.activations and sharded.shards == 4 and whole.gathered == 0
    # The root unit (embeddings, head, final norm: everything outside the blocks) with the gradients of all but the
    # input embeddings; the block computing, the one prefetched, its gradients and the last reduce-scatter buffer.
    root = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("blocks."))
    embeddings = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Embedding))
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    assert 0 < embeddings < root and sharded.gathered == max(2 * root - embeddings + 4 * block, 2 * root + block)
    assert sharded.peak_device == pytest.approx(sharded.weights + sharded.gradients + sharded.state_device
                                                + sharded.activations + sharded.gathered)
    assert refused.error and "cannot be sharded with FSDP2" in refused.error  # bitsandbytes
    from lit_optim.errors import HyperparameterError

    with pytest.raises(HyperparameterError, match="shards must be a positive number"):
        estimate(model, ["adamw_torch"], shards=0)


def test_the_trainer_config_says_how_many_devices_share_the_model(capsys):
    from lit_optim.cli import main
    from lit_optim.errors import IncompatibleConfigError
    from lit_optim.memory_estimate import shards_of

    fsdp2 = {"_target_": "lit_optim.task.fsdp2.FSDP2Strategy"}
    assert shards_of({"strategy": fsdp2, "devices": 4}) == 4
    assert shards_of({"strategy": fsdp2, "devices": 8, "num_nodes": 2}) == 16
    assert shards_of({"strategy": fsdp2, "devices": [0, 1]}) == 2
    assert shards_of({"strategy": fsdp2, "devices": "0,1,2"}) == 3
    assert shards_of({"strategy": fsdp2, "devices": "2"}) == 2
    assert shards_of({"strategy": "model_parallel", "devices": 4}) == 4  # the task shards with FSDP2 under it
    assert shards_of({"strategy": fsdp2, "devices": 1}) == 1  # FSDP2 still: its names, its gathered units
    assert shards_of({"strategy": "ddp", "devices": 8}) is shards_of({"strategy": "auto", "devices": 1}) is None
    for fsdp1 in ("fsdp", "fsdp_cpu_offload", {"_target_": "lightning.pytorch.strategies.fsdp.FSDPStrategy"}):
        with pytest.raises(IncompatibleConfigError, match="not FSDP1"):
            shards_of({"strategy": fsdp1, "devices": 8})
    with pytest.raises(IncompatibleConfigError, match="names no number of devices"):
        shards_of({"strategy": fsdp2, "devices": []})
    if not torch.cuda.is_available():
        with pytest.raises(IncompatibleConfigError, match=r"give the number .* trainer.devices=8"):
            shards_of({"strategy": fsdp2, "devices": -1})
    (est,), _ = estimate_run(["trainer=fsdp2", "trainer.devices=4"])
    assert est.shards == 4 and est.gathered > 0
    assert main(["estimate", "trainer=fsdp2", "trainer.devices=4", "optim=adamw_torch,adamw_fused_8bit"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 gathered" in out and "sharded over 4 devices with FSDP2" in out and "| adamw_fused_8bit |" in out


def test_fsdp2_holds_what_the_estimate_models_on_two_cpu_ranks(tmp_path):
    """The peak of what FSDP2 holds beyond the shards in a training step on two CPU ranks (gathered parameters,
    all-gather buffers, unsharded gradients, reduce-scatter buffers; tests/fsdp2_gathered.py) is the estimate's
    `gathered_bytes` to the byte, in fp32 and in bf16-mixed. And FSDP2's mixed-precision policy is what keeps
    autocast from holding a 16-bit copy of the weights after forward."""
    from harness import read_rank_results, run_gloo_ranks

    out = tmp_path / "gathered.json"
    run_gloo_ranks(Path(__file__).resolve().parent / "fsdp2_gathered.py", str(out), cwd=tmp_path)
    r = read_rank_results(out)
    for key in ("32-true", "bf16-mixed", "bf16-mixed, autocast only"):
        assert r[key]["held"] == r[key]["modelled"] > 0, (key, r[key])
    assert r["bf16-mixed"]["held"] < 0.7 * r["32-true"]["held"]  # 16-bit gathers; fp32 reduce-scatter buffers
    assert r["bf16-mixed"]["parts"]["root_grads"] < r["bf16-mixed"]["parts"]["root"]  # input embeddings' come last
    copies = {key: r[key]["copies_after_forward"] / (2 * r[key]["linear_weights"]) for key in r}
    assert copies["bf16-mixed"] == 0 and copies["bf16-mixed, autocast only"] > 0.5, copies


def test_a_16_bit_true_precision_trains_the_model_in_16_bits():
    """Lightning converts the model to the dtype of `bf16-true`/`16-true` whatever it was built in; so does the
    estimate (with `model.dtype` unset it used to count fp32 weights, gradients and state)."""
    (fp32,), _ = estimate_run(["optim=adamw_torch"])
    (bf16,), _ = estimate_run(["optim=adamw_torch", "trainer.precision=bf16-true"])
    assert bf16.weights == fp32.weights / 2 and bf16.state_device == fp32.state_device / 2
