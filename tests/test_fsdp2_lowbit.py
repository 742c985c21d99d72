"""FSDP2 (`fully_shard`, DTensor parameters) on two CPU processes (gloo): the optimizer steps each rank's shard, and
the gathered parameters match one process stepping the whole model (tests/fsdp2_consistency.py does the runs).

torch AdamW is exact, and so are StableAdamW (its update clipping takes the RMS of the whole DTensor) and
schedule-free AdamW. Muon orthogonalises the whole DTensor matrix too, in bf16 Newton-Schulz iterations whose sums
run in another order on a shard: within a few percent of the update (with the iterations in fp32 the difference is
4e-8). lit_optim's fused low-bit optimizers quantize each shard's blocks on their own: where a shard
boundary is a block boundary (the 64 x 64 weights, 2048 elements a rank) they stay within rounding of one process;
a shard that splits a block (each 64-element bias) gets other scales and drifts by a few percent of the update.
Every rank keeps the same kind of codes (bits, block size) for its shard; sharded checkpoints of them are
tests/test_fsdp2_resume.py's.
"""

from __future__ import annotations

from pathlib import Path

from harness import read_rank_results, run_gloo_ranks

NAMES = ["adamw_torch", "adamw_fused_8bit", "adamw_fused_4bit", "stable_adamw", "schedule_free_adamw", "muon"]


def test_fsdp2_steps_sharded_parameters_like_one_process(tmp_path):
    out = tmp_path / "fsdp2.json"
    run_gloo_ranks(Path(__file__).resolve().parent / "fsdp2_consistency.py", str(out), *NAMES, cwd=tmp_path)
    r = read_rank_results(out)
    assert all("error" not in r[n] for n in NAMES), r
    assert all(r[n]["dtensor"] == "DTensor" for n in NAMES)
    # Parameters: [weight 0, bias 0, weight 2, bias 2]; "same_grads" feeds the shards one process's gradients.
    for name in ("adamw_torch", "stable_adamw", "schedule_free_adamw"):
        assert max(r[name]["backward"]) < 1e-6 and max(r[name]["same_grads"]) == 0.0, (name, r[name])
        assert r[name]["moved"] > 1e-3, (name, r[name])
    assert 0 < max(r["muon"]["same_grads"]) < 0.05 * r["muon"]["moved"], r["muon"]
    for name, bits in (("adamw_fused_8bit", 8), ("adamw_fused_4bit", 4)):
        moved, diffs = r[name]["moved"], r[name]["same_grads"]
        assert max(diffs[0], diffs[2]) < 0.01 * moved, (name, diffs, moved)  # block-aligned shards: rounding only
        assert max(diffs) < 0.1 * moved, (name, diffs, moved)  # split blocks: other scales, still close
        # Each rank keeps codes for its own 2048 elements only (4-bit: two codes a byte).
        assert r[name]["state_shapes"]["exp_avg"] == [2048 * bits // 8], r[name]["state_shapes"]
