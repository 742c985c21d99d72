"""lit_optim's fused low-bit optimizers on CPU: the codes, the reference step, state, resume and the Triton kernel
through Triton's interpreter. The GPU side (bit-for-bit kernel vs reference, speed) is tests/test_lowbit_gpu.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from harness import weights_only_resume

import lit_optim
from lit_optim.kernels import codes
from lit_optim.optimizers.lowbit import LowBitAdam, LowBitAdamW, LowBitLion


@pytest.mark.parametrize("bits", [8, 4])
def test_signed_codes_round_to_the_nearest_level_and_keep_the_block_maximum(bits):
    torch.manual_seed(0)
    x = torch.randn(16, 128) * torch.logspace(-6, 1, 16)[:, None]  # blocks of very different scales
    stored, scale = codes.encode(x, bits, signed=True)
    y = codes.decode(stored, scale, bits, 128, signed=True)
    top = codes.SIGNED_MAX[bits]
    levels = (torch.arange(-top, top + 1, dtype=torch.float64) / top)
    levels = levels * levels.abs()
    rel = (x / scale[:, None]).double()
    nearest_sqrt = torch.sign(rel) * torch.round(rel.abs().sqrt() * top) / top  # nearest in the companded domain
    assert torch.allclose((y / scale[:, None]).double(), nearest_sqrt * nearest_sqrt.abs(), atol=1e-6)
    assert torch.equal(y.abs().amax(1), scale)  # the largest magnitude is kept exactly
    on_level = ((y / scale[:, None]).double()[..., None] - levels).abs().amin(-1)
    assert bool((on_level < 1e-6).all())
    assert torch.equal(torch.sign(y)[y != 0], torch.sign(x)[y != 0])


@pytest.mark.parametrize("bits", [8, 4])
def test_second_moment_codes_never_round_to_zero(bits):
    torch.manual_seed(1)
    v = torch.rand(8, 256) ** 8  # a wide range of positive values, some tiny
    v[0, :5] = 0.0
    stored, scale = codes.encode(v, bits, signed=False)
    w = codes.decode(stored, scale, bits, 256, signed=False)
    smallest = scale / codes.UNSIGNED_LEVELS[bits] ** 4
    assert bool((w >= smallest[:, None] * (1 - 1e-6)).all())  # rounded up, never to 0: the update only shrinks
    assert torch.equal(w.amax(1), scale)
    # nearest level in the fourth-root domain
    r = (v / scale[:, None]).double() ** 0.25
    n = codes.UNSIGNED_LEVELS[bits]
    expect = torch.clamp(torch.round(r * n), 1, n) / n
    assert torch.allclose((w / scale[:, None]).double() ** 0.25, expect, atol=1e-6)


def test_four_bit_codes_pack_the_two_halves_of_a_block_into_one_byte():
    x = torch.zeros(1, 8)
    x[0, 0], x[0, 4] = 1.0, -1.0  # element 0 and element 0 + block/2 share byte 0
    stored, _ = codes.encode(x, 4, signed=True)
    assert stored.dtype == torch.uint8 and stored.numel() == 4
    assert int(stored[0]) == (7 + 8) | ((-7 + 8) << 4)
    assert all(int(b) == 0x88 for b in stored[1:])  # code 0 is stored as 8 in each nibble


def test_an_all_zero_moment_decodes_to_zero_and_sizes_are_padded_blocks():
    for bits in (8, 4):
        c, s = codes.empty_moment(1000, bits, 256, True, "cpu")
        assert c.numel() == 4 * 256 * bits // 8 and s.numel() == 4
        assert torch.equal(codes.decode(c, s, bits, 256, True), torch.zeros(4, 256))
        assert codes.state_bytes(1000, bits, 256, 2) == 2 * (c.numel() + 4 * 4)


def _fit(make, steps=150, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 32)
    y = x @ torch.randn(32, 1) + 0.1 * torch.randn(256, 1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = make(model.parameters())
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), model, opt


def test_eight_bit_adamw_tracks_fp32_adamw():
    ref, *_ = _fit(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    ours, *_ = _fit(lambda p: LowBitAdamW(p, lr=3e-3, weight_decay=0.01))
    adam, *_ = _fit(lambda p: LowBitAdam(p, lr=3e-3))
    assert ref < 0.1
    assert abs(ours - ref) < 0.25 * ref + 0.01, (ours, ref)
    assert abs(adam - ref) < 0.25 * ref + 0.01, (adam, ref)
    four, *_ = _fit(lambda p: LowBitAdamW(p, lr=3e-3, weight_decay=0.01, bits=4))
    assert four < 0.5 * _fit(lambda p: torch.optim.SGD(p, lr=0.0))[0]  # 4-bit is coarser, but it learns


def test_lion_matches_a_plain_lion_up_to_the_momentum_codes():
    def plain_lion(params, lr=1e-3, betas=(0.9, 0.99)):
        params = list(params)
        state = [torch.zeros_like(p) for p in params]

        class _Lion(torch.optim.Optimizer):
            def step(self):
                with torch.no_grad():
                    for p, m in zip(params, state):
                        c = betas[0] * m + (1 - betas[0]) * p.grad
                        p.add_(torch.sign(c), alpha=-lr)
                        m.mul_(betas[1]).add_(p.grad, alpha=1 - betas[1])
        return _Lion(params, {})

    ref, *_ = _fit(lambda p: plain_lion(p, lr=1e-3), steps=100)
    ours, *_ = _fit(lambda p: LowBitLion(p, lr=1e-3), steps=100)
    assert abs(ours - ref) < 0.1 * ref + 0.01, (ours, ref)


@pytest.mark.parametrize("name", ["adamw_fused_8bit", "adamw_fused_4bit", "adam_fused_8bit", "lion_fused_4bit"])
def test_state_is_plain_tensors_that_resume_exactly_through_weights_only_checkpoints(name):
    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))

    torch.manual_seed(0)
    opt = weights_only_resume(model, name, [torch.randn(16, 40) for _ in range(6)], lr=1e-3)
    codes_dtype = {t.dtype for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")}
    assert codes_dtype <= {torch.int8, torch.uint8}


def test_bf16_parameters_keep_their_dtype_and_a_tensor_lr_equals_a_float_lr():
    def run(lr):
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 64).to(torch.bfloat16)
        o = LowBitAdamW(m.parameters(), lr=lr)
        for _ in range(3):
            o.zero_grad()
            m(torch.randn(8, 64, dtype=torch.bfloat16)).float().square().mean().backward()
            o.step()
        return m

    a, b = run(1e-3), run(torch.tensor(1e-3))
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_stochastic_rounding_on_cpu_is_unbiased():
    p = torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
    p.grad = -torch.ones_like(p)
    opt = LowBitLion([p], lr=2.0 ** -9, stochastic_rounding=True)  # a quarter of the way to the next bf16
    opt.step()
    assert set(torch.unique(p.float()).tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs((p.float().mean().item() - 1.0) / 2.0 ** -9 - 1.0) < 0.05


def test_kernel_triton_without_cuda_says_what_it_needs():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = LowBitAdamW([p], kernel="triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on")
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
        opt.step()


INTERPRETED = textwrap.dedent("""
    import math, torch
    from lit_optim.kernels import codes
    from lit_optim.kernels.reference import ADAM, ADAMW, LION, step_tensor
    from lit_optim.kernels.triton_lowbit import step_many
    worst = 0.0
    for bits, block, exact in ((8, 64, False), (4, 32, False), (8, 32, True)):
        for mode in (ADAM, ADAMW, LION):
            torch.manual_seed(mode)
            shapes = [(5, 130), (1,), (40,)]  # whole blocks (unmasked), spans, a partial last block (masked)
            ref = [torch.randn(s) for s in shapes]
            ker = [p.clone() for p in ref]
            sr = [codes.empty_state(p.numel(), bits, block, 1 if mode == LION else 2, "cpu") for p in ref]
            sk = [{k: v.clone() for k, v in s.items()} for s in sr]
            for step in (1, 2):
                grads = [torch.randn_like(p) for p in ref]
                hp = dict(mode=mode, bits=bits, block_size=block, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.1, inv_bc1=1 / (1 - 0.9 ** step), inv_sqrt_bc2=1 / math.sqrt(1 - 0.99 ** step))
                for p, g, s in zip(ref, grads, sr):
                    step_tensor(p, g, s, **hp)
                step_many(ker, grads, sk, span=2, exact=exact, **hp)
            for a, b in zip(ref, ker):
                worst = max(worst, (a - b).abs().max().item())
            for x, y in zip(sr, sk):
                for key in x:
                    if key.endswith("_scale"):
                        assert torch.allclose(x[key], y[key], rtol=1e-5, atol=0), key
                    else:  # the interpreter's fp32 arithmetic is not IEEE-exact: a code may flip at a midpoint
                        assert (x[key].int() != y[key].int()).float().mean() < 0.02, key
    print("WORST", worst)
""")


def test_the_triton_kernel_computes_the_reference_step_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[1])
    assert worst < 1e-3, worst  # a flipped code moves a parameter by at most lr * a fraction


def test_names_report_what_they_build():
    opt = lit_optim.build_optimizer(torch.nn.Linear(8, 8), "adamw_fused_4bit")
    assert type(opt) is LowBitAdamW and opt.param_groups[0]["bits"] == 4
    assert opt.param_groups[0]["block_size"] == 256
    assert math.isclose(lit_optim.get_spec("lion_fused_8bit").state_bytes((1024,), {}), 1024 + 4 * 4)


@pytest.mark.parametrize("bits,block", [(8, 256), (4, 128), (4, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_step_in_runs_of_blocks_equals_one_pass_bit_for_bit(monkeypatch, bits, block, dtype):
    """The CPU path steps big tensors a run of blocks at a time (for the cache); every run length gives the same
    parameters and codes as one pass over the whole tensor."""
    from lit_optim.kernels import reference

    def train(run_elements):
        monkeypatch.setattr(reference, "CPU_RUN_ELEMENTS", run_elements)
        gen = torch.Generator().manual_seed(3)
        n = 9 * 1024 + 77  # several runs and a padded last block
        out = {}
        for mode in (reference.ADAM, reference.ADAMW, reference.LION):
            p = torch.randn(n, generator=gen).to(dtype)
            state = codes.empty_state(n, bits, block, reference.MOMENTS[mode], "cpu")
            for t in (1, 2, 3):
                g = torch.randn(n, generator=gen).to(dtype)
                reference.step_tensor(p, g, state, mode=mode, bits=bits, block_size=block, lr=1e-2, beta1=0.9,
                                      beta2=0.99, eps=1e-8, weight_decay=0.1, inv_bc1=1 / (1 - 0.9 ** t),
                                      inv_sqrt_bc2=1 / math.sqrt(1 - 0.99 ** t))
            out[mode] = (p, state)
        return out

    whole, runs = train(1 << 40), train(2 * 1024)
    for mode, (p, state) in whole.items():
        q, other = runs[mode]
        assert torch.equal(p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           q.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)


# --- DTensor parameters (FSDP2) in one process: a 1-rank process group -----------------------------------------------


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _dtensor_params(placements, mesh_shape=(1,)):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    torch.manual_seed(0)
    shapes = ((65, 64), (3, 2))
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(*shape), mesh, placements)) for shape in shapes]
    for p in params:
        p.grad = distribute_tensor(torch.randn(p.shape), mesh, placements)
    return params


def test_dim0_sharded_state_goes_out_as_dtensors_and_comes_back_exactly(one_rank):
    from torch.distributed.tensor import DTensor, Shard

    params = _dtensor_params([Shard(0)])
    opt = LowBitAdamW(params, lr=1e-2, bits=4)
    opt.step()
    sd = opt.state_dict()
    entry = sd["state"][0]
    assert isinstance(entry["exp_avg"], DTensor) and entry["exp_avg"].shape == (1, 17 * 128)
    assert entry["exp_avg"].placements == (Shard(0),) and entry["exp_avg_scale"].shape == (1, 17)
    assert entry["shard_layout"].tolist() == [1, 65, 64] and not isinstance(entry["shard_layout"], DTensor)
    assert not any(isinstance(v, DTensor) for v in opt.state[params[0]].values())  # the live state stays plain
    twin = LowBitAdamW(_dtensor_params([Shard(0)]), lr=1e-2, bits=4)
    twin.load_state_dict(sd)
    for p, q in zip(params, twin.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            assert type(twin.state[q][key]) is torch.Tensor and torch.equal(twin.state[q][key], value), key


def test_replicated_dtensors_keep_plain_state(one_rank):
    from torch.distributed.tensor import DTensor, Replicate

    params = _dtensor_params([Replicate()])
    opt = LowBitLion(params)
    opt.step()
    assert not any(isinstance(v, DTensor) for s in opt.state_dict()["state"].values() for v in s.values())


@pytest.mark.parametrize("case", ["shard_dim1", "hsdp"])
def test_other_placements_are_refused_at_the_first_step(one_rank, case):
    from torch.distributed.tensor import Replicate, Shard

    params = (_dtensor_params([Shard(1)]) if case == "shard_dim1"
              else _dtensor_params([Replicate(), Shard(0)], mesh_shape=(1, 1)))
    with pytest.raises(ValueError, match="sharded on dim 0 over a 1-D mesh") as err:
        LowBitAdamW(params).step()
    assert "Fix:" in str(err.value)


def test_a_sharded_checkpoint_into_an_unsharded_optimizer_or_the_wrong_shape_is_refused(one_rank):
    from torch.distributed.tensor import Shard

    params = _dtensor_params([Shard(0)])
    opt = LowBitAdamW(params)
    opt.step()
    sd = opt.state_dict()
    plain = [torch.nn.Parameter(torch.randn(65, 64)), torch.nn.Parameter(torch.randn(3, 2))]
    with pytest.raises(ValueError, match="saved sharded over 1 ranks .* but not sharded here"):
        LowBitAdamW(plain).load_state_dict(sd)
    # Plain state of a 65 x 64 tensor (17 blocks) into a 10 x 64 one (3 blocks of 256 codes).
    ref = LowBitAdamW(plain)
    for p in plain:
        p.grad = torch.randn_like(p)
    ref.step()
    small = LowBitAdamW([torch.nn.Parameter(torch.randn(10, 64)), torch.nn.Parameter(torch.randn(3, 2))])
    with pytest.raises(ValueError, match="needs 768: the checkpoint was written for another parameter shape"):
        small.load_state_dict(ref.state_dict())
