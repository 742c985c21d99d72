"""lit_optim's fused low-bit kernels on a GPU: bit-for-bit against the plain-torch reference, stochastic rounding,
a tensor learning rate without recompiling, and exact resume. Run on a GPU machine: ``pytest -m gpu``."""

from __future__ import annotations

import math

import pytest
import torch
from harness import weights_only_resume

from lit_optim.kernels import codes
from lit_optim.kernels.reference import ADAM, ADAMW, LION, step_tensor

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 1024), (3, 1000), (1,), (257,), (128, 129), (50_000,)]


def _state(p, bits, block, mode):
    return codes.empty_state(p.numel(), bits, block, 1 if mode == LION else 2, p.device)


@pytest.mark.parametrize("bits,block", [(8, 256), (4, 128), (8, 64), (4, 512)])
@pytest.mark.parametrize("mode", [ADAM, ADAMW, LION])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_bit_for_bit(bits, block, mode, dtype):
    from lit_optim.kernels.triton_lowbit import step_many

    torch.manual_seed(bits * 100 + block + mode)
    ref = [torch.randn(s, device="cuda").to(dtype) for s in SHAPES]
    fused = [p.clone() for p in ref]
    s_ref = [_state(p, bits, block, mode) for p in ref]
    s_fused = [{k: v.clone() for k, v in s.items()} for s in s_ref]
    for step in range(1, 5):
        grads = [torch.randn_like(p) * (10.0 ** torch.randint(-6, 2, (1,)).item()) for p in ref]
        hp = dict(mode=mode, bits=bits, block_size=block, lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.1, inv_bc1=1 / (1 - 0.9 ** step), inv_sqrt_bc2=1 / math.sqrt(1 - 0.99 ** step))
        for p, g, s in zip(ref, grads, s_ref):
            step_tensor(p, g, s, **hp)
        step_many(fused, grads, s_fused, exact=True, **hp)
        torch.cuda.synchronize()
    for a, b, sa, sb, shape in zip(ref, fused, s_ref, s_fused, SHAPES):
        assert torch.equal(a, b), (shape, (a.float() - b.float()).abs().max().item())
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (shape, key)


@pytest.mark.parametrize("bits,block", [(8, 256), (4, 128)])
@pytest.mark.parametrize("mode", [ADAM, ADAMW, LION])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_kernel_is_within_the_stated_tolerance_of_the_reference(bits, block, mode, dtype):
    """The default (approximate square root and division, fused multiply-adds), one step from the same state:
    parameters within 1e-6 relative (fp32) or one bf16 ulp (Lion: a step's sign may flip where it is ~0), codes at
    most one level apart for under 1% of them."""
    from lit_optim.kernels.triton_lowbit import step_many

    torch.manual_seed(7)
    ref = [torch.randn(s, device="cuda").to(dtype) for s in SHAPES]
    s_ref = [_state(p, bits, block, mode) for p in ref]
    for step in range(1, 4):  # a realistic state first (the same for both below)
        grads = [torch.randn_like(p) for p in ref]
        hp = dict(mode=mode, bits=bits, block_size=block, lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.1, inv_bc1=1 / (1 - 0.9 ** step), inv_sqrt_bc2=1 / math.sqrt(1 - 0.99 ** step))
        for p, g, s in zip(ref, grads, s_ref):
            step_tensor(p, g, s, **hp)
    fast = [p.clone() for p in ref]
    s_fast = [{k: v.clone() for k, v in s.items()} for s in s_ref]
    grads = [torch.randn_like(p) for p in ref]
    for p, g, s in zip(ref, grads, s_ref):
        step_tensor(p, g, s, **hp)
    step_many(fast, grads, s_fast, **hp)
    for a, b in zip(ref, fast):
        if mode == LION:  # a sign: where b1 * m + (1 - b1) * g is within rounding of 0, the step may flip (2 lr)
            off = (a.float() - b.float()).abs() > 1e-5
            assert float(off.float().mean()) < 1e-3 and float((a.float() - b.float()).abs().max()) <= 2.01 * 3e-3
            continue
        if dtype == torch.float32:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a - b).abs().max()
        else:
            ulp = torch.finfo(torch.bfloat16).eps * a.float().abs().clamp(min=1e-30)
            assert bool(((a.float() - b.float()).abs() <= ulp * 1.01).all())
    for sa, sb in zip(s_ref, s_fast):
        for key in sa:
            if key.endswith("_scale"):
                assert torch.allclose(sa[key], sb[key], rtol=1e-5, atol=0), key
            else:
                x, y = codes._unpack(sa[key], bits, block), codes._unpack(sb[key], bits, block)
                assert int((x - y).abs().max()) <= 1, key
                assert float((x != y).float().mean()) < 0.01, key


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    from lit_optim.kernels.triton_lowbit import step_many

    # lr 0 and no decay: the fp32 update is the parameter itself plus a tiny offset, far below bf16's spacing.
    n = 1 << 20
    base = torch.full((n,), 1.0, device="cuda", dtype=torch.bfloat16)
    total = torch.zeros(n, device="cuda")
    trials = 64
    for t in range(trials):
        p = base.clone()
        g = torch.full((n,), -1.0, device="cuda", dtype=torch.bfloat16)
        s = _state(p, 8, 256, LION)
        # Lion moves by exactly lr * sign: 1 + 2**-10 sits a quarter of the way from 1 to the next bf16 (1 + 2**-7)
        step_many([p], [g], [s], mode=LION, bits=8, block_size=256, lr=2.0 ** -9, beta1=0.9, beta2=0.99, eps=0.0,
                  weight_decay=0.0, stochastic_rounding=True, seed=t)
        up = 1.0 + 2.0 ** -7
        assert bool(((p == 1.0) | (p == up)).all())
        total += p.float()
    mean_step = (total / trials - 1.0).mean().item()
    assert abs(mean_step - 2.0 ** -9) < 0.05 * 2.0 ** -9, mean_step


def test_tensor_lr_changes_without_recompiling_and_matches_float_lr():
    import time

    from lit_optim.optimizers.lowbit import LowBitAdamW

    torch.manual_seed(0)
    a = torch.nn.Linear(512, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.nn.Linear(512, 512, device="cuda", dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    lr = torch.tensor(1e-3, device="cuda")
    oa = LowBitAdamW(a.parameters(), lr=1e-3)
    ob = LowBitAdamW(b.parameters(), lr=lr)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).float().square().mean().backward()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            o.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        new = 1e-3 / (i + 2)
        oa.param_groups[0]["lr"] = new
        lr.fill_(new)
    # The first step of each compiles (or loads) its variant; later steps with new lr values compile nothing.
    assert max(times[2:]) < 0.05, times
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["adamw_fused_8bit", "adamw_fused_4bit", "lion_fused_8bit"])
def test_resume_is_exact_through_weights_only_checkpoints(name):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).to(
            device="cuda", dtype=torch.bfloat16)

    torch.manual_seed(1)
    batches = [torch.randn(32, 256, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    weights_only_resume(model, name, batches, lr=1e-3, stochastic_rounding=True)


def test_first_step_is_not_a_compile_per_shape():
    import time

    from lit_optim.optimizers.lowbit import LowBitAdamW

    shapes = [(1024 + i, 512) for i in range(16)]  # 16 distinct shapes: one launch, no compilation per shape
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LowBitAdamW(params, lr=1e-3)
    opt.step()  # compiles the one kernel variant (or loads it from Triton's cache)
    torch.cuda.synchronize()
    more = [torch.nn.Parameter(torch.randn((2048 + i, 256), device="cuda", dtype=torch.bfloat16)) for i in range(8)]
    for p in more:
        p.grad = torch.randn_like(p)
    opt2 = LowBitAdamW(more, lr=1e-3)
    t0 = time.perf_counter()
    opt2.step()
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 0.5  # new shapes, same kernel: no compilation
