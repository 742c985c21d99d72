"""benchmarks/lowbit_sass.py: the fused low-bit kernel compiled for sm_90 here, with no GPU, and its loop counted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.test_optimizer_step_bench import load_benchmark

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its ptxas)")


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("lowbit_sass")
    if not (Path(module.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this Triton carries no cuobjdump")
    return module


def test_the_loop_is_one_block_and_exact_mode_costs_more(bench):
    fast, exact = bench.count(8, 256), bench.count(8, 256, exact=True)
    # one warp steps a block of 256: 8 elements per thread; ~60 instructions each (benchmarks/README.md)
    assert 300 < fast["per_block"] < 800 and fast["per_element"] == fast["per_block"] / 8
    ops = dict(fast["opcodes"])
    assert ops["MUFU"] >= 3 * 8  # the update's and both encodes' square roots, per element
    assert ops.get("LDS", 0) == ops.get("STS", 0) == ops.get("BAR", 0) == 0  # no shared memory in the loop
    assert exact["per_block"] > 1.3 * fast["per_block"]  # IEEE roots and divisions, codes settled by comparisons


def test_the_main_loop_is_the_longest_backward_branch(bench):
    sass = """
        /*0000*/   MOV R1, c[0x0][0x28] ;
        /*0010*/   FADD R2, R2, R3 ;
        /*0020*/   @P0 BRA 0x10 ;
        /*0030*/   FMUL R4, R4, R4 ;
        /*0040*/   FFMA R4, R4, R4, R5 ;
        /*0050*/   @!P1 BRA 0x30 ;
        /*0060*/   EXIT ;
    """
    assert bench.main_loop(sass) == ["FMUL R4, R4, R4", "FFMA R4, R4, R4, R5", "@!P1 BRA 0x30"]
    assert [bench.opcode(t) for t in bench.main_loop(sass)] == ["FMUL", "FFMA", "BRA"]
    with pytest.raises(RuntimeError, match="no loop"):
        bench.main_loop("/*0000*/ EXIT ;")
