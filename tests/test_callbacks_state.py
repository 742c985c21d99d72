"""OptimizerStateMonitor and the accounting behind it, checked against byte counts worked out independently: from each
backend's documented layout (codes, scales, maps, fp32 fallback below 4096 elements) and from the real storages."""

from __future__ import annotations

import math

import pytest
import torch
from callbacks_support import eager_torchao, fit, read_csv, storage_bytes, values  # noqa: F401  (fixture)
from torch import nn

from lit_optim import build_optimizer
from lit_optim.callbacks import OptimizerStateMonitor
from lit_optim.state_bytes import state_report, total_state_bytes


def param_state_bytes(name: str, p: torch.Tensor, is_embedding: bool) -> tuple[int, bool]:
    """(state bytes, quantized?) of one parameter after one step, from the backend's documented layout."""
    n = p.numel()
    if name == "adamw_torch":
        return 2 * 4 * n + 4, False  # exp_avg, exp_avg_sq, fp32 step tensor
    if name in ("adamw_torch_8bit", "adamw_torch_4bit"):
        # adamw_torch_4bit uses Hugging Face's block 256 (torchao's own default is 128)
        block, code_bytes, qmap = (256, 1.0, 256) if name.endswith("8bit") else (256, 0.5, 16)
        if n >= 4096 and n % block == 0:  # codes + block scales + quantization map, per moment
            return 2 * (int(n * code_bytes) + 4 * (n // block) + 4 * qmap) + 4, True
        return 2 * 4 * n + 4, False
    if name == "adamw_bnb_8bit":
        if n >= 4096 and not is_embedding:  # Embedding weights keep 32-bit state (as Hugging Face does)
            return 2 * n + 2 * 4 * math.ceil(n / 256), True
        return 2 * 4 * n, False
    raise ValueError(name)


BNB_SHARED_MAPS = 2 * 256 * 4  # bitsandbytes' two quantization maps, shared by all 8-bit parameters


def expected_bytes(name: str, model: nn.Module) -> dict[int, tuple[int, bool]]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {id(p): param_state_bytes(name, p, id(p) in embeddings) for p in model.parameters()}


@pytest.mark.parametrize("name, per_param", [("adamw_torch_8bit", 2.03125), ("adamw_torch_4bit", 1.03125),
                                             ("adamw_bnb_8bit", 2.03125), ("adamw_torch", 8.0)])
def test_bytes_per_param_on_large_tensors(name, per_param, eager_torchao):
    model = nn.Sequential(nn.Linear(1024, 2048, bias=False), nn.Linear(2048, 16, bias=False))  # 2M + 32K params
    opt = build_optimizer(model, name, lr=1e-3)
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    report = state_report(opt)
    assert report.total.bytes == storage_bytes(opt) == total_state_bytes(opt)
    big, small = model[0].weight.numel(), model[1].weight.numel()
    if name == "adamw_torch":
        assert report.total.full_precision_params == big + small and report.total.quantized_params == 0
    else:
        # The large matrix is quantized; the 32K one too (>= 4096 and a multiple of the block size).
        assert report.total.quantized_params == big + small and report.total.quantized_tensors == 2
    assert report.total.bytes_per_param == pytest.approx(per_param, abs=0.005)
    assert report.total.ratio_to_adamw_fp32 == pytest.approx(per_param / 8, abs=0.001)


@pytest.mark.parametrize("name", ["adamw_torch_8bit", "adamw_torch_4bit", "adamw_bnb_8bit"])
def test_monitor_logs_real_state_bytes_to_csv(tmp_path, name, eager_torchao):
    trainer, module = fit(tmp_path, {"name": name, "lr": 1e-3}, 4, [OptimizerStateMonitor(log_every_n_steps=2)],
                          log_every_n_steps=2)
    opt = trainer.optimizers[0]
    rows = read_csv(trainer)
    per_param = expected_bytes(name, module.model)
    shared = BNB_SHARED_MAPS if name == "adamw_bnb_8bit" else 0
    total = sum(b for b, _ in per_param.values()) + shared
    logged = values(rows, "optim_state/bytes")
    # After the first optimizer step (Lightning's logging step 0), then at the interval ends (steps 1 and 3).
    assert [s for s, _ in logged] == [0, 1, 3]
    assert all(v == total == storage_bytes(opt) for _, v in logged)
    last = next(r for r in reversed(rows) if "optim_state/bytes" in r)
    params = sum(p.numel() for p in module.parameters())
    assert last["optim_state/trainable_params"] == params
    assert last["optim_state/trainable_tensors"] == len(per_param)
    assert last["optim_state/quantized_tensors"] == sum(q for _, q in per_param.values()) > 0
    assert last["optim_state/full_precision_tensors"] == sum(not q for _, q in per_param.values()) > 0
    assert last["optim_state/quantized_params"] == sum(p.numel() for p in module.parameters() if per_param[id(p)][1])
    assert last["optim_state/quantized_params"] + last["optim_state/full_precision_params"] == params
    assert last["optim_state/quantized_bytes"] + last["optim_state/full_precision_bytes"] == total
    assert last["optim_state/bytes_per_param"] == pytest.approx(total / params)
    assert last["optim_state/ratio_to_adamw_fp32"] == pytest.approx(total / params / 8)
    # All on the CPU, none pinned or managed.
    assert last["optim_state/bytes_cpu"] == total
    assert last["optim_state/bytes_gpu"] == last["optim_state/bytes_managed"] == 0
    assert last["optim_state/bytes_cpu_pinned"] == 0
    # By dtype: the uint8 bytes are exactly the quantized parameters' codes.
    dtypes = {k.removeprefix("optim_state/bytes_dtype/"): v for k, v in last.items()
              if k.startswith("optim_state/bytes_dtype/")}
    assert sum(dtypes.values()) == total
    code_bytes = {"adamw_torch_4bit": 1.0, "adamw_torch_8bit": 2.0, "adamw_bnb_8bit": 2.0}[name]
    assert dtypes["uint8"] == code_bytes * last["optim_state/quantized_params"]
    # Per param group (lit_optim's decay / no_decay), summing to the total; shared maps go with the first user.
    groups = {g["name"]: g["params"] for g in opt.param_groups}
    assert list(groups) == ["decay", "no_decay"]
    for g, ps in groups.items():
        assert last[f"optim_state/group/{g}/params"] == sum(p.numel() for p in ps)
        assert last[f"optim_state/group/{g}/bytes"] == sum(per_param[id(p)][0] for p in ps) + (
            shared if g == "decay" else 0)
        assert last[f"optim_state/group/{g}/quantized_params"] == sum(p.numel() for p in ps if per_param[id(p)][1])


def test_monitor_records_built_optimizer_in_hparams(tmp_path, eager_torchao):
    trainer, _ = fit(tmp_path, {"name": "adamw_torch_4bit", "lr": 1e-3}, 2, [OptimizerStateMonitor()])
    import yaml

    hparams = yaml.safe_load(open(f"{trainer.logger.log_dir}/hparams.yaml"))
    built = hparams["optimizer_built"]
    assert built["class"] == "torchao.optim.AdamW4bit" and built["bits"] == 4 and built["paged"] is False
    assert built["block_size"] == trainer.optimizers[0].block_size == 256  # the name's default in effect, not "null"
    assert [g["name"] for g in built["groups"]] == ["decay", "no_decay"]
    assert built["trainable_params"] == sum(p.numel() for p in trainer.lightning_module.parameters())


def test_paged_tag_counts_as_managed_memory():
    """bitsandbytes marks its CUDA managed buffers `is_paged = True` (their device reads cpu): they are managed."""
    model = nn.Linear(256, 256, bias=False)
    opt = build_optimizer(model, "paged_adamw_8bit", lr=1e-3)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()  # on a CPU bitsandbytes falls back to ordinary buffers; tag them the way its GPU path does
    for key in ("state1", "state2"):
        opt.state[model.weight][key].is_paged = True
    report = state_report(opt)
    paged = sum(opt.state[model.weight][k].untyped_storage().nbytes() for k in ("state1", "state2"))
    assert report.total.by_location["managed"] == paged == 2 * 65536
    assert report.total.by_location["cpu"] == report.total.bytes - paged > 0


class _PerParamWrapper(torch.optim.Optimizer):
    """An in-backward style wrapper: one real inner optimizer per parameter, exposed through the protocol."""

    def __init__(self, params):
        params = list(params)
        super().__init__([{"params": params, "name": "wrapped"}], {"lr": 1e-2})
        self.inner = {p: torch.optim.Adam([p], lr=1e-2) for p in params}

    def lit_optim_inner_optimizers(self):
        return list(self.inner.values())

    def step(self, closure=None):
        for opt in self.inner.values():
            opt.step()


class _Projector:
    def __init__(self, n):
        self.ortho_matrix = torch.zeros(n, 4)
        self.rank = 4


class _ExplicitProtocol(torch.optim.SGD):
    """Reports its state through ``lit_optim_state_tensors`` (a host buffer through ``lit_optim_buffer_tensors``)."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.private = {p: torch.zeros(p.numel(), dtype=torch.bfloat16) for g in self.param_groups for p in g["params"]}
        self.host_copy = {p: torch.zeros(p.shape) for g in self.param_groups for p in g["params"]}

    def lit_optim_state_tensors(self):
        for p, t in self.private.items():
            yield p, "m", t

    def lit_optim_buffer_tensors(self):
        for p, t in self.host_copy.items():
            yield p, "host_param", t


def test_wrapper_optimizers_and_nested_state():
    a, b = nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(100))
    for p in (a, b):
        p.grad = torch.randn_like(p)
    wrapper = _PerParamWrapper([a, b])
    wrapper.step()
    report = state_report(wrapper)
    assert report.total.bytes == sum(storage_bytes(o) for o in wrapper.inner.values()) == 2 * 4 * (2048 + 100) + 2 * 4
    assert report.total.params == 2148 and set(report.groups) == {"wrapped"}

    # GaLore-like: a projector object with its matrix inside the state is state; the parameter it references is not.
    sgd = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    sgd.step()
    proj = _Projector(64)
    proj.param = a  # a reference to the parameter itself must not count
    sgd.state[a]["projector"] = proj
    report = state_report(sgd)
    assert report.total.bytes == 4 * a.numel() + 4 * 64 * 4

    explicit = _ExplicitProtocol([a, b])
    report = state_report(explicit)
    assert report.total.bytes == 2 * (2048 + 100) and report.total.by_dtype == {"bfloat16": 2 * 2148}
    assert report.buffer_bytes == 4 * 2148 and report.buffer_by_location["cpu"] == 4 * 2148


def test_stateless_optimizer_counts_params_but_no_bytes(tmp_path):
    trainer, module = fit(tmp_path, {"name": "sgd", "lr": 1e-2}, 2, [OptimizerStateMonitor()])
    row = next(r for r in read_csv(trainer) if "optim_state/bytes" in r)
    assert row["optim_state/bytes"] == 0 and row["optim_state/bytes_per_param"] == 0
    assert row["optim_state/stateless_params"] == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_layerwise"])
def test_lowrank_projectors_and_in_backward_state_are_counted(tmp_path, name):
    """lit_optim's GaLore (projector matrices in the state) and its in-backward variant (per-parameter optimizers
    stepped during backward, behind one wrapper)."""
    trainer, module = fit(tmp_path, {"name": name, "lr": 1e-3}, 2, [OptimizerStateMonitor()])
    opt = trainer.optimizers[0]
    logged = next(r for r in read_csv(trainer) if "optim_state/bytes" in r)
    projectors = sum(v.untyped_storage().nbytes() for s in opt.state.values() for k, v in s.items()
                     if k.startswith("proj_") and isinstance(v, torch.Tensor))
    assert projectors > 0
    assert logged["optim_state/bytes"] == storage_bytes(opt) > projectors
    assert logged["optim_state/trainable_params"] == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, hp", [("galore_adamw_8bit", {"rank": 16}), ("adamw_8bit", {"in_backward": True}),
                                      ("adamw_torch", {"offload": "cpu"})])
def test_own_wrappers_implement_the_nesting_protocol(name, hp):
    """lit_optim's own wrappers speak the protocol the README offers users: inner optimizers for walking, state
    tensors attributed to the model's parameters for accounting -- and the accounting equals the storages."""
    from lit_optim.nesting import leaves as _leaves

    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))
    opt = build_optimizer(model, name, lr=1e-3, **hp)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    leaves = list(_leaves([opt]))
    assert leaves and all(not hasattr(leaf, "lit_optim_inner_optimizers") for leaf in leaves)
    params = {id(p) for p in model.parameters()}
    attributed = [p for p, _, _ in opt.lit_optim_state_tensors()]
    assert attributed and all(id(p) in params for p in attributed)
    assert state_report(opt).total.bytes == storage_bytes(opt)
