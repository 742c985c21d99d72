"""Big models on one GPU, measured the way a user runs them: each row is one `lit-optim train` process.

Every configuration runs as its own process (so "launch to step 1" includes imports, the model build on the GPU,
data and torch.compile), logs through lit_optim's monitors to CSV, and is read back from that CSV:

- launch->step 1: `timing/launch_to_first_step_s` (process start to the end of the first optimizer step);
- first step: `timing/warmup/first_optimizer_step_ms` (the first optimizer update alone: torchao compiles here);
- opt step / tokens/s: medians over the logged intervals of `timing/optimizer_step_ms` and
  `throughput/tokens_per_sec` (one interval per step here; the step timer's warm-up steps are not logged, and the
  first logged interval is dropped as well): a single interval can catch a garbage collection or a log flush;
- peak / reserved / managed / host: the highest `memory/peak_allocated_bytes`, `memory/peak_reserved_bytes`,
  `memory/managed_bytes` (paged state, outside the allocator), `memory/host_peak_rss_bytes`;
- B/param: `optim_state/bytes_per_param`;
- fits 24/40/80: peak *reserved* (what the allocator must be allowed) <= that many GiB; managed memory is extra.

Suites (one H200; transformers, torchao, bitsandbytes needed):

    python benchmarks/big_models.py --suite seed --out seed.json          # the 4 seed recipes, 8B, 1 x 32 accumulation
    python benchmarks/big_models.py --suite budget40 --out budget40.json  # the same under max_device_memory_gib=40
    python benchmarks/big_models.py --suite memory_bound --out mb.json    # 8B, no accumulation, per optimizer
    python benchmarks/big_models.py --suite fused --out fused.json        # the same setting: fused vs 8-bit steps
    python benchmarks/big_models.py --suite scale --out scale.json        # 24 GiB and 30B recipes, 1B offload
    python benchmarks/big_models.py --suite tiny                          # CPU smoke test of this script (CI)

`--only LABEL ...` runs a subset. torchao rows marked "(cold)" get an empty inductor cache directory, "(warm)" reuse
the one the cold row filled: the first step of a user's second run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the clone: the package next to it

from lit_optim.run_metrics import RunMetrics, failure_reason  # noqa: E402

SEED = ["adamw_torch", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"]
# torch's fused AdamW (bf16 state), lit_optim's fused 8/4-bit Triton steps, torchao's and bitsandbytes' 8-bit AdamW.
FUSED = ["adamw_torch_fused", "adamw_fused_8bit", "adamw_fused_4bit", "adamw_torch_8bit", "adamw_bnb_8bit"]
# The seed recipe's model, schedule and precision, with one micro-batch per optimizer step: the optimizer step
# sets the pace, as at small batches on a big model.
MEMORY_BOUND = ["recipe=llama31_8b_adamw_torch", "trainer.accumulate_grad_batches=1", "trainer.max_steps=12",
                "callbacks.step_timing.warmup_steps=2"]

# label -> (overrides, inductor cache: None | "fresh" | "reuse:<label>")
Row = tuple[str, list[str], str | None]


def suite(name: str) -> list[Row]:
    if name == "seed":
        return [(f"seed {o}", [f"recipe=llama31_8b_{o}", "trainer.max_steps=4", "callbacks.step_timing.warmup_steps=1"],
                 None) for o in SEED]
    if name == "budget40":
        return [(f"40GiB {o}", [f"recipe=llama31_8b_{o}", "trainer.max_steps=2", "max_device_memory_gib=40"], None)
                for o in SEED]
    if name == "memory_bound":
        mb = MEMORY_BOUND
        return [
            ("adamw_torch_fused", [*mb, "optim=adamw_torch_fused"], None),
            ("adamw_torch_8bit (cold)", [*mb, "optim=adamw_torch_8bit"], "fresh"),
            ("adamw_torch_8bit (warm)", [*mb, "optim=adamw_torch_8bit"], "reuse:adamw_torch_8bit (cold)"),
            ("adamw_torch_4bit (cold)", [*mb, "optim=adamw_torch_4bit"], "fresh"),
            ("adamw_torch_4bit (warm)", [*mb, "optim=adamw_torch_4bit"], "reuse:adamw_torch_4bit (cold)"),
            ("adamw_8bit", [*mb, "optim=adamw_8bit"], None),
            ("paged_adamw_8bit", [*mb, "optim=paged_adamw_8bit"], None),
            ("adamw_fused_8bit", [*mb, "optim=adamw_fused_8bit"], None),  # lit_optim's fused Triton kernels
            ("adamw_fused_4bit", [*mb, "optim=adamw_fused_4bit"], None),
        ]
    if name == "fused":  # issue 13's end-to-end comparison: the fused low-bit steps against fused AdamW and 8-bit
        return [(f"fused {o}", [*MEMORY_BOUND, f"optim={o}"], None) for o in FUSED]
    if name == "offload":
        mb = [*MEMORY_BOUND[:2], "trainer.max_steps=6", "callbacks.step_timing.warmup_steps=2"]
        return [
            ("adamw_torch offload=cpu", [*mb, "optim=adamw_torch", "optim.offload=cpu"], None),
            ("adamw_torch offload=cpu+grads", [*mb, "optim=adamw_torch", "optim.offload=cpu",
                                               "optim.offload_gradients=true", "trainer.gradient_clip_val=null"], None),
            ("adamw_8bit offload=cpu", [*mb, "optim=adamw_8bit", "optim.offload=cpu"], None),
            ("1B adamw_torch", [*MEMORY_BOUND, "model=llama_1b", "model.dtype=bfloat16"], None),
            ("1B adamw_torch offload=cpu", [*MEMORY_BOUND, "model=llama_1b", "model.dtype=bfloat16",
                                            "optim.offload=cpu"], None),
            # bitsandbytes' 8-bit step on the host: the low-bit offload row at a size its CPU step finishes.
            ("1B adamw_8bit", [*MEMORY_BOUND[:2], "trainer.max_steps=6", "callbacks.step_timing.warmup_steps=2",
                               "model=llama_1b", "model.dtype=bfloat16", "optim=adamw_8bit"], None),
            ("1B adamw_8bit offload=cpu", [*MEMORY_BOUND[:2], "trainer.max_steps=6",
                                           "callbacks.step_timing.warmup_steps=2", "model=llama_1b",
                                           "model.dtype=bfloat16", "optim=adamw_8bit", "optim.offload=cpu"], None),
        ]
    if name == "scale":
        return [
            ("8B 24GiB recipe", ["recipe=llama31_8b_24gb", "trainer.max_steps=12"], None),
            ("30B 80GiB recipe", ["recipe=llama_30b_80gb", "trainer.max_steps=12"], None),
        ]
    if name == "tiny":
        small = ["trainer.accelerator=cpu", "trainer.max_steps=3", "data.train_tokens=4096", "data.seq_len=32"]
        return [("tiny adamw_torch", [*small, "optim=adamw_torch"], None),
                ("tiny bad budget", [*small, "optim=adamw_torch", "max_device_memory_gib=40"], None)]
    raise SystemExit(f"unknown suite {name!r}")


def run_row(label: str, overrides: list[str], workdir: Path, env: dict[str, str], timeout: float) -> dict:
    rundir = workdir / label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-").replace("+", "_")
    cmd = [sys.executable, "-m", "lit_optim.train", *overrides, f"hydra.run.dir={rundir}", "logger=csv",
           "+logger.flush_logs_every_n_steps=1", "validate=false", "callbacks.checkpoint=null",
           "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
    start = time.time()
    timed_out = False
    with open(workdir / f"{rundir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            # wait4: this child's own resource usage (max RSS), not the sum over every child so far.
            deadline = start + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() > deadline:
                    timed_out = True
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
        finally:
            proc.returncode = os.waitstatus_to_exitcode(status) if pid else -9
    wall = time.time() - start
    text = (workdir / f"{rundir.name}.log").read_text(errors="replace")
    # Our own kill at the deadline is a timeout, not the kernel's out-of-memory killer.
    error = f"timed out after {timeout:.0f} s (--timeout)" if timed_out else failure_reason(text, proc.returncode)
    m = RunMetrics.find(rundir)

    def last(key):
        return m.last(key)

    def steady(key):
        values = m.values(key)[1:] or m.values(key)
        return statistics.median(values) if values else None

    def top(key, scale=1.0):
        value = m.max(key)
        return None if value is None else value / scale

    reserved = top("memory/peak_reserved_bytes", GIB)
    row = {
        "label": label, "overrides": overrides, "exit": proc.returncode, "error": error, "wall_s": round(wall, 1),
        "launch_to_first_step_s": last("timing/launch_to_first_step_s"),
        "first_step_s": (last("timing/warmup/first_optimizer_step_ms") or 0) / 1000 or None,
        "opt_step_ms": steady("timing/optimizer_step_ms"),
        "tokens_per_s": steady("throughput/tokens_per_sec"),
        "tokens_per_s_last": last("throughput/tokens_per_sec"),
        "peak_gib": top("memory/peak_allocated_bytes", GIB), "reserved_gib": reserved,
        "managed_gib": top("memory/managed_bytes", GIB),
        # While training (the monitor's reading). The process's lifetime peak (ru_maxrss) is kept beside it: it would
        # show a host copy of the weights made after fit, which `lit-optim train` now avoids.
        "host_rss_gib": top("memory/host_peak_rss_bytes", GIB), "host_rss_lifetime_gib": usage.ru_maxrss * 1024 / GIB,
        "state_b_per_param": last("optim_state/bytes_per_param"),
        "fits": {g: reserved <= g for g in (24, 40, 80)} if reserved is not None else None,
        "steps_logged": len(m.values("timing/optimizer_step_ms")),
    }
    return row


def copy_speeds(gib: float = 2.0) -> dict[str, float]:
    """GB/s of pinned host<->device copies and of a host memcpy: the ceilings of an offloaded step."""
    import torch

    n = int(gib * GIB)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    other = torch.empty(n, dtype=torch.uint8)
    out = {}
    for name, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)),
                     ("d2h", lambda: host.copy_(dev, non_blocking=True)),
                     ("host_copy", lambda: other.copy_(host))):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        # A host copy reads and writes every byte; the PCIe copies move each byte once.
        out[f"{name}_gb_s"] = (2 if name == "host_copy" else 1) * 3 * n / (time.perf_counter() - start) / 1e9
    return out


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def table(rows: list[dict]) -> str:
    head = ("| run | exit | launch->step 1 s | first step s | opt step ms | tok/s | peak GiB | reserved GiB | "
            "managed GiB | host RSS GiB | state B/param | fits 24/40/80 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fits = "/".join("yes" if r["fits"][g] else "no" for g in (24, 40, 80)) if r["fits"] else "-"
        lines.append(
            f"| {r['label']} | {r['exit']} | {fmt(r['launch_to_first_step_s'], '{:.1f}')} | "
            f"{fmt(r['first_step_s'], '{:.2f}')} | {fmt(r['opt_step_ms'], '{:.1f}')} | "
            f"{fmt(r['tokens_per_s'], '{:.0f}')} | "
            f"{fmt(r['peak_gib'])} | {fmt(r['reserved_gib'])} | {fmt(r['managed_gib'])} | {fmt(r['host_rss_gib'])} | "
            f"{fmt(r['state_b_per_param'], '{:.3f}')} | {fits} |")
    errors = [f"- {r['label']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + errors)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", required=True)
    parser.add_argument("--only", nargs="*", help="labels to run (default: the whole suite)")
    parser.add_argument("--out", help="JSON file for the rows")
    parser.add_argument("--workdir", help="run directories and logs (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lit_optim_big_"))
    workdir.mkdir(parents=True, exist_ok=True)
    caches: dict[str, str] = {}
    rows: list[dict] = []
    for name in args.suite:
        for label, overrides, cache in suite(name):
            if args.only and label not in args.only:
                continue
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
            if cache == "fresh":
                env["TORCHINDUCTOR_CACHE_DIR"] = caches[label] = tempfile.mkdtemp(prefix="inductor_", dir=workdir)
            elif cache and cache.startswith("reuse:"):
                env["TORCHINDUCTOR_CACHE_DIR"] = caches[cache.partition(":")[2]]
            row = run_row(label, overrides, workdir, env, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row: a call killed at its time limit still keeps the rows that finished
                Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    speeds = copy_speeds() if torch.cuda.is_available() and "offload" in args.suite else {}
    print(f"\ndevice: {device}; torch {torch.__version__}; {speeds}\n{table(rows)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "copy_speeds": speeds,
                                              "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
