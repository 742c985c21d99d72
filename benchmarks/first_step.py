"""First-step (compile) time of torchao's low-bit AdamW on Llama-3.1-8B parameter shapes: cold vs warm cache.

torchao `torch.compile`s its step once per distinct parameter signature, so the first optimizer step of a run is
compile time. Each trial runs in a fresh process (in-process Dynamo caches would otherwise hide the cost):

- cold: an empty ``TORCHINDUCTOR_CACHE_DIR`` (a temp dir), as on a fresh machine or container;
- warm: a second process on the same directory, as every later run with lit_optim's persistent cache.

    python benchmarks/first_step.py                      # one parameter per distinct 8B shape, bf16, on cuda
    python benchmarks/first_step.py --full               # all 8.03B parameters (32 layers; ~50 GB of device memory)
    python benchmarks/first_step.py --smoke              # tiny shapes on CPU (a check that the script runs)

The optimizer is built through ``lit_optim.build_optimizer`` (its param groups: norms without weight decay), which is
exactly torchao's ``AdamW8bit`` / ``AdamW4bit`` for these names.
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

VOCAB, HIDDEN, INTER, KV = 128256, 4096, 14336, 1024  # Llama-3.1-8B: 8 KV heads x 128
LAYER = {  # name -> shape, one decoder layer
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV, HIDDEN),
    "self_attn.v_proj.weight": (KV, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTER), "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}
SMOKE = {  # every tensor >= 4096 elements and divisible by both block sizes (256, 128), as the real ones are
    "model.embed_tokens.weight": (512, 64), "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.self_attn.k_proj.weight": (128, 64), "model.layers.0.mlp.down_proj.weight": (64, 256),
    "model.layers.0.input_layernorm.weight": (4096,),
}


def param_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    if kind == "smoke":
        return dict(SMOKE)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    layers = 32 if kind == "full" else 1
    for i in range(layers):
        for name, shape in LAYER.items():
            if kind == "distinct" and name in ("self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                               "mlp.up_proj.weight", "post_attention_layernorm.weight"):
                continue  # same signature as k / q / gate / input norm: compiled once anyway
            shapes[f"model.layers.{i}.{name}"] = shape
    shapes["model.norm.weight"] = (HIDDEN,)
    if kind == "full":
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)  # untied in Llama-3.1-8B; same signature as the embedding
    return shapes


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch._dynamo.utils import counters

    import lit_optim
    from lit_optim.noise import quiet_import_noise

    quiet_import_noise()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    named = []
    with torch.device(device):
        for name, shape in param_shapes(args.shapes).items():
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=gen))
            p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)
            named.append((name, p))
    opt = lit_optim.build_optimizer(named, args.optimizer, lr=1e-5, weight_decay=0.1)
    sync()
    times = []
    for _ in range(2 + args.steady_steps):
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    ind, aot = counters["inductor"], counters["aot_autograd"]
    print("RESULT " + json.dumps({
        "first_s": times[0], "second_s": times[1], "steady_ms": 1e3 * statistics.median(times[2:] or times[1:]),
        "graphs": counters["stats"]["unique_graphs"], "params": sum(p.numel() for _, p in named),
        "fx_hit": ind["fxgraph_cache_hit"], "fx_miss": ind["fxgraph_cache_miss"],
        "fx_bypass": ind["fxgraph_cache_bypass"],
        "aot_hit": aot["autograd_cache_hit"], "aot_miss": aot["autograd_cache_miss"],
        "aot_bypass": aot["autograd_cache_bypass"], "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }), flush=True)


def run_trial(args: argparse.Namespace, optimizer: str, cache_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--optimizer", optimizer, "--device", args.device,
           "--dtype", args.dtype, "--steady-steps", str(args.steady_steps), "--shapes", args.shapes_kind]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lit_optim importable without an install
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"trial failed ({optimizer}, rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": wall}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=["adamw_torch_8bit", "adamw_torch_4bit"])
    ap.add_argument("--full", action="store_true", help="all 8.03B parameters instead of one per distinct shape")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32: checks that the script runs")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (smoke: float32)")
    ap.add_argument("--steady-steps", type=int, default=5)
    ap.add_argument("--warm-trials", type=int, default=1, help="warm processes per optimizer (the best is shown)")
    ap.add_argument("--cache-root", default=None,
                    help="where the per-optimizer cold cache dirs go (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    # internal: one trial in this process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    import torch  # only for the defaults; trials import it themselves

    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.shapes_kind = "smoke" if args.smoke else ("full" if args.full else "distinct")
    if args.smoke:
        args.steady_steps = min(args.steady_steps, 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lit_optim_first_step_", dir=args.cache_root) as root:
        for name in args.optimizers:
            cache = os.path.join(root, name)  # a fresh, empty cache per optimizer: "cold" is really cold
            cold = run_trial(args, name, cache)
            warm = min((run_trial(args, name, cache) for _ in range(args.warm_trials)), key=lambda r: r["first_s"])
            rows.append({"optimizer": name, "cold": cold, "warm": warm})
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{args.shapes_kind} shapes ({rows[0]['cold']['params'] / 1e6:,.1f}M params, {args.dtype}) on {dev}, "
          f"torch {torch.__version__}")
    print("| optimizer | graphs | cold first step s | warm first step s | warm cache hits fx/aot (misses) "
          "| steady step ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c, w = r["cold"], r["warm"]
        print(f"| {r['optimizer']} | {c['graphs']} | {c['first_s']:.2f} | {w['first_s']:.2f} | "
              f"{w['fx_hit']}/{w['aot_hit']} ({w['fx_miss']}/{w['aot_miss']}) | {w['steady_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
