"""Peak memory of optimizer-in-backward vs the normal step, and of GaLore / APOLLO / Adam-mini / LOMO vs AdamW.

Every configuration runs in this one process, one after another, on a freshly built model: the previous model and
optimizer are freed and the allocator's peak is reset in between. For each it reports

- state:     optimizer state bytes, counted from the real storages (lit_optim.state_bytes.total_state_bytes);
- grads:     the most gradient bytes alive at any moment of backward (in-backward frees each as it steps);
- peak:      torch.cuda.max_memory_allocated during the steps, minus the weights (CUDA only);
- step ms:   median wall time of one training step (forward + backward + optimizer) after the first.

GPU (the ~1B Llama architecture: hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, bf16 weights):

    python benchmarks/lowrank_memory.py --out lowrank_memory.json                              # bf16 weights
    python benchmarks/lowrank_memory.py --dtype fp32 --autocast --out lowrank_memory_mixed.json  # bf16-mixed

CPU smoke test (tiny model, seconds; what CI runs):

    python benchmarks/lowrank_memory.py --tiny --out /tmp/lowrank_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lit_optim
from lit_optim.state_bytes import total_state_bytes

# (label, registry name, extra hyperparameters, uses --rank)
CONFIGS = [
    ("adamw_torch", "adamw_torch", {}, False),
    ("adamw_torch in_backward", "adamw_torch", {"in_backward": True}, False),
    ("galore_adamw", "galore_adamw", {}, True),
    ("galore_adamw_layerwise", "galore_adamw_layerwise", {}, True),
    ("galore_adamw_8bit", "galore_adamw_8bit", {}, True),
    ("galore_adamw_8bit_layerwise", "galore_adamw_8bit_layerwise", {}, True),
    ("apollo_adamw", "apollo_adamw", {}, True),
    ("apollo_adamw_layerwise", "apollo_adamw_layerwise", {}, True),
    ("apollo_mini", "apollo_mini", {}, False),
    ("apollo_mini_layerwise", "apollo_mini_layerwise", {}, False),
    ("adam_mini", "adam_mini", {}, False),
    ("adam_mini in_backward", "adam_mini", {"in_backward": True}, False),
    ("lomo", "lomo", {}, False),
    ("adalomo", "adalomo", {}, False),
]
UNITS = {"GiB": 1024**3, "MiB": 1024**2}
UNIT = "GiB"


def llama_1b(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096}


def llama_tiny(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def build_model(args, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if args.arch == "llama":
                import transformers

                cfg = (llama_tiny if args.tiny else llama_1b)(args.vocab)
                model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
            else:
                from lit_optim.task.tiny_lm import TinyLM

                model = TinyLM(vocab_size=args.vocab, d_model=64, n_layers=2, n_heads=4, max_seq_len=args.seq)
    finally:
        torch.set_default_dtype(previous)
    return model


class GradWatch:
    """The most gradient bytes alive at once during backward (hooks run after the optimizer's own)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, p) -> None:
        alive = sum(q.grad.numel() * q.grad.element_size() for q in self.params if q.grad is not None)
        # The gradient that just completed counts even if its optimizer already freed it.
        if p.grad is None:
            alive += p.numel() * p.element_size()
        self.peak = max(self.peak, alive)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(label, name, hp, args, device, dtype) -> dict:
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build_model(args, device, dtype)
    sync(device)
    weights = torch.cuda.memory_allocated() if cuda else sum(p.numel() * p.element_size() for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    opt = lit_optim.build_optimizer(model, name, lr=args.lr, **hp)
    watch = GradWatch(model)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    def closure():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            out = model(tokens[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss

    times, losses = [], []
    in_backward = hasattr(opt, "stepping")
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        if in_backward:
            loss = opt.step(closure)  # backward inside the stepping window: each parameter steps in its hook
        else:
            loss = closure()
            opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    row = {
        "label": label, "name": name, "hyperparameters": {k: v for k, v in hp.items()},
        "class": type(opt).__name__, "in_backward": in_backward,
        "weights_bytes": weights,
        "state_bytes": total_state_bytes(opt),
        "max_live_grad_bytes": watch.peak,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_above_weights_bytes": (torch.cuda.max_memory_allocated() - weights) if cuda else None,
        "steady_above_weights_bytes": (torch.cuda.memory_allocated() - weights) if cuda else None,
        "first_step_ms": times[0] * 1e3,
        "step_ms": statistics.median(times[1:]) * 1e3 if len(times) > 1 else times[0] * 1e3,
        "losses": losses,
    }
    watch.remove()
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    opt = model = watch = tokens = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


# (heading, row key, width, what it holds): "bytes" are shown in UNIT, "ms" as they are.
COLUMNS = [("state", "state_bytes", 10, "bytes"), ("max grads", "max_live_grad_bytes", 14, "bytes"),
           ("peak-weights", "peak_above_weights_bytes", 17, "bytes"), ("peak", "peak_bytes", 9, "bytes"),
           ("step ms", "step_ms", 9, "ms"), ("1st step ms", "first_step_ms", 12, "ms")]


def table(rows: list[dict], columns=None, unit: str | None = None) -> str:
    """Rows as a fixed-width text table (also used by lightning_memory.py, with its own columns)."""
    columns, unit = columns or COLUMNS, unit or UNIT

    def cell(value, kind: str) -> str:
        if value is None:
            return "n/a"
        return f"{value / UNITS[unit]:.3f}" if kind == "bytes" else f"{value:.1f}"

    head = f"{'optimizer':32s}" + "".join(
        f" {title + (' ' + unit if kind == 'bytes' else ''):>{width}s}" for title, _, width, kind in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:32s} ERROR: {r['error']}")
            continue
        lines.append(f"{r['label']:32s}" + "".join(f" {cell(r[key], kind):>{width}s}"
                                                   for _, key, width, kind in columns))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (a smoke test of seconds)")
    parser.add_argument("--arch", choices=["auto", "llama", "tiny"], default="auto",
                        help="auto: transformers' Llama (the tiny built-in TinyLM with --tiny)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32000; 256 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 1; 2 with --tiny)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; 32 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration (default 3; 2 with --tiny)")
    parser.add_argument("--rank", type=int, default=None,
                        help="GaLore/APOLLO rank (default 512, the papers' 1B setting; 16 with --tiny)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="weights (default bf16; fp32 --tiny)")
    parser.add_argument("--autocast", action="store_true",
                        help="run forward under bf16 autocast (with --dtype fp32: Lightning's precision='bf16-mixed')")
    parser.add_argument("--names", nargs="*", default=None, help="labels to run (default: all; see CONFIGS)")
    parser.add_argument("--out", type=str, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    global UNIT
    tiny = args.tiny
    UNIT = "MiB" if tiny else "GiB"
    args.steps = args.steps or (2 if tiny else 3)
    args.arch = ("tiny" if tiny else "llama") if args.arch == "auto" else args.arch
    args.vocab = args.vocab or (256 if tiny else 32000)
    args.batch = args.batch or (2 if tiny else 1)
    args.seq = args.seq or (32 if tiny else 1024)
    args.rank = args.rank or (16 if tiny else 512)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if tiny else "bf16")]
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if not tiny and device.type != "cuda":
        print("no CUDA GPU: use --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    if tiny:
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    rows = []
    wanted = set(args.names) if args.names else None
    for label, name, hp, ranked in CONFIGS:
        if wanted is not None and label not in wanted:
            continue
        hp = {**hp, **({"rank": args.rank} if ranked else {})}
        try:
            row = run_one(label, name, hp, args, device, dtype)
        except Exception as err:  # noqa: BLE001 - one failing configuration must not hide the others
            row = {"label": label, "name": name, "error": f"{type(err).__name__}: {err}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)

    print()
    print(table(rows))
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "arch": args.arch, "tiny": tiny, "dtype": str(dtype),
        "autocast_bf16": args.autocast,
        "vocab": args.vocab,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "rank": args.rank, "table_unit": UNIT,
        "model": (llama_tiny if tiny else llama_1b)(args.vocab) if args.arch == "llama" else "TinyLM",
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"\nwrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
