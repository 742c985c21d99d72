"""Count the machine instructions of lit_optim's fused low-bit kernel, with no GPU: compile it for sm_90 with the
ptxas that Triton's package carries, disassemble with its cuobjdump, and count the main loop (one quantization block
per iteration).

Instruction count is what bounds the kernel once memory is fast enough: with W warp-instructions per block of B
elements, N parameters take N / B * W warp-instructions, issued at most 4 per clock per multiprocessor.

    python benchmarks/lowbit_sass.py                      # 8- and 4-bit AdamW, bf16 parameters, default blocks
    python benchmarks/lowbit_sass.py --bits 8 --block 128 --exact --dump k8.sass

The Triton that compiles here decides the code: the GPU machines run their own (see benchmarks/README.md for which).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lit_optim.kernels import codes
from lit_optim.kernels import triton_lowbit as kernel
from lit_optim.kernels.reference import ADAMW
from lit_optim.optimizers.lowbit import DEFAULT_BLOCK

SIGNATURE = {"chunk_tensor": "*i32", "chunk_block": "*i32", "numels": "*i64", "addresses": "*i64",
             "num_tensors": "i32", "lr_ptr": "*fp32", "lr": "fp32", "beta1": "fp32", "beta2": "fp32", "eps": "fp32",
             "wd": "fp32", "inv_bc1": "fp32", "inv_sqrt_bc2": "fp32", "seed": "i32"}
_DTYPES = {"bf16": tl.bfloat16, "fp32": tl.float32}


def compile_sm90(bits: int, block: int, *, mode: int = ADAMW, dtype: str = "bf16", exact: bool = False):
    """The kernel as `step_many` launches it for aligned tensors (fast or exact mode), compiled for sm_90."""
    const = dict(MODE=mode, BITS=bits, TOP=float(codes.SIGNED_MAX[bits]), LEVELS=float(codes.UNSIGNED_LEVELS[bits]),
                 BLOCK=block, P_DTYPE=_DTYPES[dtype], G_DTYPE=_DTYPES[dtype], LR_IN_MEMORY=False, STOCHASTIC=False,
                 ALIGNED=True, SPAN=kernel.SPAN, EXACT=exact, ASM=True)
    src = ASTSource(fn=kernel.lowbit_step_kernel, signature={**SIGNATURE, **dict.fromkeys(const, "constexpr")},
                    constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=kernel._num_warps(bits, block), enable_fp_fusion=not exact))


def disassemble(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([str(tool), "--dump-sass", path], check=True, capture_output=True, text=True).stdout


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's loop (the kernel's loop over a program's full blocks)."""
    ins = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(start, addr) for addr, text in ins
             if (m := re.search(r"BRA (0x[0-9a-f]+)", text)) and (start := int(m.group(1), 16)) < addr]
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return [text for addr, text in ins if start <= addr <= end]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T0-9]\s+", "", text).split()[0].split(".")[0]


def count(bits: int, block: int, **kw) -> dict:
    sass = disassemble(compile_sm90(bits, block, **kw).asm["cubin"])
    loop = main_loop(sass)
    threads = 32 * kernel._num_warps(bits, block)
    return {"bits": bits, "block": block, "triton": triton.__version__, "per_block": len(loop),
            "per_element": len(loop) * threads / block, "warp_instructions_per_param": len(loop) / block,
            "opcodes": collections.Counter(opcode(t) for t in loop).most_common(), "sass": sass}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--block", type=int, help="default: the registry's block size for the bits")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--params", type=float, default=64 * 4096**2, help="for the total (default 1.074B)")
    ap.add_argument("--dump", help="write the last kernel's SASS here")
    args = ap.parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90, {'exact' if args.exact else 'fast'} mode, {args.dtype} parameters")
    for bits in args.bits:
        block = args.block or DEFAULT_BLOCK[bits]
        c = count(bits, block, dtype=args.dtype, exact=args.exact)
        total = c["warp_instructions_per_param"] * args.params
        top = ", ".join(f"{op} {n}" for op, n in c["opcodes"][:8])
        print(f"{bits}-bit, block {block}: {c['per_block']} instructions per block per warp, "
              f"{c['per_element']:.1f} per element; {total:.3g} warp-instructions for {args.params:.4g} params; {top}")
        if args.dump:
            Path(args.dump).write_text(c["sass"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
