"""Device paths of the core and the ClientApp, parametrized by device.

Every test runs once per entry of ``DEVICES``: on ``cpu`` in the normal suite (so the test logic
cannot rot between GPU runs) and on ``cuda`` where a CUDA device exists. The CUDA cases carry the
``cuda`` marker (``pytest -m cuda`` runs exactly them; ``benchmarks/gpu_check.sh`` does) and skip
cleanly without CUDA.

What the CUDA cases guard: adaptor banks and the mixture move with ``.to(device)`` (a bank left on
the CPU fails the forward), the per-device caches of the mixture context, merge on the device,
state dicts crossing devices (device -> wire/disk -> CPU and back), autocast bf16/fp16 through
the folds, and the ClientApp training and evaluating on the device (``device='cuda'``,
``mixed-precision='bf16'``) with the same numbers as on the CPU.

References are computed independently of the fold code: per adaptor, the two small layers the
official code runs (``tests/test_floral_layers.py`` helpers), from the tensors the state API
shows, on the same device.
"""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from floral_flwr.floral import Floral
from test_floral_layers import (ALPHA, C, _normalize, randomize, ref_conv, ref_conv_transpose,
                                ref_probs)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")]),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off while comparing with float32 references (cuDNN convs use TF32 by default,
    which rounds to 10 mantissa bits); restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tol(device: str) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if device == "cpu" else dict(atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- every layer kind on the device

def _ref_linear(fm, x):
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    out = F.linear(x, sd["base.0.weight"], sd["base.0.bias"])
    for c in range(C):
        out = out + ALPHA * p[c] * F.linear(F.linear(x, sd["adaptor.0.in"][c]), sd["adaptor.0.out"][c],
                                            sd["adaptor.0.bias"][c])
    return out


def _ref_embedding(fm, idx):
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    out = F.embedding(idx, sd["base.0.weight"])
    for c in range(C):
        out = out + ALPHA * p[c] * F.linear(F.embedding(idx, sd["adaptor.0.in"][c]), sd["adaptor.0.out"][c])
    return out


def _ref_norm(fm, x):
    main = fm.model[0]
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    xhat = _normalize(main, x)
    channel_first = not isinstance(main, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))
    view = (1, -1) + (1,) * (x.dim() - 2)

    def affine(w, b):
        w = w.reshape(main.weight.shape)
        out = xhat * (w.view(view) if channel_first else w)
        if b is not None:
            out = out + (b.view(view) if channel_first else b.reshape(w.shape))
        return out

    out = affine(sd["base.0.weight"], sd.get("base.0.bias"))
    for c in range(C):
        b = sd["adaptor.0.bias"][c] if "adaptor.0.bias" in sd else None
        out = out + ALPHA * p[c] * affine(sd["adaptor.0.weight"][c], b)
    return out


def _conv_ref(method):
    def ref(fm, x):
        main = fm.model[0]
        if isinstance(main, nn.modules.conv._ConvTransposeNd):
            return ref_conv_transpose(fm, main, x, method)
        return ref_conv(fm, None, main, x, method)
    return ref


# (id, layer factory, input factory, Floral options, reference)
KINDS = [
    ("linear", lambda: nn.Linear(24, 16), lambda g: torch.randn(64, 24, generator=g), {}, _ref_linear),
    ("linear-unfold", lambda: nn.Linear(24, 16), lambda g: torch.randn(3, 24, generator=g),
     {"linear_compute": "unfold"}, _ref_linear),
    ("conv1d", lambda: nn.Conv1d(3, 8, 3, padding=1), lambda g: torch.randn(2, 3, 9, generator=g), {},
     _conv_ref("balanced_2d")),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), groups=2),
     lambda g: torch.randn(2, 4, 9, 11, generator=g), {}, _conv_ref("balanced_2d")),
    ("conv2d-in", lambda: nn.Conv2d(3, 8, 3), lambda g: torch.randn(2, 3, 8, 8, generator=g),
     {"conv_method": "in"}, _conv_ref("in")),
    ("conv3d", lambda: nn.Conv3d(2, 4, 3, padding=1), lambda g: torch.randn(1, 2, 4, 5, 5, generator=g), {},
     _conv_ref("balanced_2d")),
    ("conv-transpose2d", lambda: nn.ConvTranspose2d(4, 3, 3, stride=2),
     lambda g: torch.randn(2, 4, 5, 5, generator=g), {}, _conv_ref("balanced_2d")),
    ("embedding", lambda: nn.Embedding(11, 6), lambda g: torch.randint(0, 11, (3, 5), generator=g),
     {"adapt_embedding": True}, _ref_embedding),
    ("batchnorm2d", lambda: nn.BatchNorm2d(5), lambda g: torch.randn(4, 5, 3, 3, generator=g),
     {"adapt_norm": True}, _ref_norm),
    ("layernorm", lambda: nn.LayerNorm((3, 4)), lambda g: torch.randn(2, 5, 3, 4, generator=g),
     {"adapt_norm": True}, _ref_norm),
    ("groupnorm", lambda: nn.GroupNorm(2, 6), lambda g: torch.randn(2, 6, 3, 3, generator=g),
     {"adapt_norm": True}, _ref_norm),
] + ([("rmsnorm", lambda: nn.RMSNorm(4), lambda g: torch.randn(2, 3, 4, generator=g),
       {"adapt_norm": True}, _ref_norm)] if hasattr(nn, "RMSNorm") else [])


def _wrapped(make, opts, seed=0):
    torch.manual_seed(seed)
    main = make()
    if isinstance(main, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():  # non-trivial statistics
            main.running_mean.normal_()
            main.running_var.uniform_(0.5, 2)
    fm = Floral(nn.Sequential(main), num_adaptors=C, rank=2, alpha=ALPHA, **opts).eval()
    randomize(fm, seed)
    return fm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,make,make_x,opts,ref", KINDS, ids=[k[0] for k in KINDS])
def test_every_layer_kind_on_device(device, name, make, make_x, opts, ref):
    """Wrapped on the CPU, moved to the device (as the ClientApp does): the forward matches the
    per-adaptor reference on the device, and the backward matches the CPU float64 copy's."""
    fm = _wrapped(make, opts)
    cpu64 = copy.deepcopy(fm).double()
    fm.to(device)
    assert all(t.device.type == device for t in fm.state_dict().values())
    x = make_x(torch.Generator().manual_seed(1))
    xd = x.to(device)
    with torch.no_grad():
        torch.testing.assert_close(fm(xd), ref(fm, xd), **_tol(device))
    # backward: every parameter's gradient equals the float64 CPU model's
    fm.train(), cpu64.train()
    x64 = x.double() if x.is_floating_point() else x
    for model, inp in ((fm, xd), (cpu64, x64)):
        model.zero_grad(set_to_none=True)
        out = model(inp)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)).sum().backward()
    grads = {n: p.grad for n, p in cpu64.named_parameters() if p.grad is not None}
    assert grads, "no gradient reached any parameter"
    for n, p in fm.named_parameters():
        if n in grads:
            assert p.grad is not None and p.grad.device.type == device, n
            torch.testing.assert_close(p.grad.cpu().double(), grads[n], atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("device", DEVICES)
def test_wrap_a_model_already_on_the_device(device):
    """Wrapping a model that already lives on the device puts the banks and the mixture there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).to(device)
    fm = Floral(model, num_adaptors=C, rank=2, alpha=ALPHA)
    assert {t.device.type for t in fm.state_dict().values()} == {device}
    fm.train()
    loss = fm(torch.randn(4, 3, 8, 8, device=device)).square().mean()
    loss.backward()
    assert fm.mixture.logits.grad is not None and fm.mixture.logits.grad.device.type == device


# ---------------------------------------------------------------- merge on the device

@pytest.mark.parametrize("device", DEVICES)
def test_merge_on_device_equals_unmerged_forward(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))
    fm = Floral(model, num_adaptors=C, rank=3, alpha=ALPHA, adapt_norm=True)
    randomize(fm)
    fm.to(device).eval()
    x = torch.randn(5, 3, 8, 8, device=device)
    merged = fm.merge()
    assert type(merged) is nn.Sequential and not hasattr(merged[0], "parametrizations")
    assert {t.device.type for t in merged.state_dict().values()} == {device}
    with torch.no_grad():
        torch.testing.assert_close(merged(x), fm(x), **_tol(device))
    # the merged copy is independent of the wrapped model (changing one leaves the other)
    with torch.no_grad():
        fm.mixture.logits[0] += 2.0  # softmax is shift-invariant: move one logit
    assert not torch.allclose(merged(x), fm(x))


# ---------------------------------------------------------------- state across devices

def _cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_state_round_trip_between_device_and_cpu(device):
    """Shared + private state of a device model, read to CPU (as the wire and the store do),
    loaded into a fresh model on the device and into one on the CPU: same outputs."""
    torch.manual_seed(0)
    src = Floral(_cnn(), num_adaptors=C, rank=2, alpha=ALPHA)
    randomize(src, seed=3)
    src.to(device).eval()
    shared = {k: v.cpu().clone() for k, v in src.shared_state_dict().items()}
    private = {k: v.cpu().clone() for k, v in src.private_state_dict().items()}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = src(x.to(device)).cpu()
    for target_device in (device, "cpu"):
        torch.manual_seed(99)  # a different init: everything must come from the state
        dst = Floral(_cnn(), num_adaptors=C, rank=2, alpha=ALPHA).to(target_device).eval()
        dst.load_shared_state_dict(shared)
        dst.load_private_state_dict(private)
        with torch.no_grad():
            torch.testing.assert_close(dst(x.to(target_device)).cpu(), expected, **_tol(device))


@pytest.mark.parametrize("device", DEVICES)
def test_private_state_saved_from_device_loads_on_cpu(device, tmp_path):
    """``StateDir.save`` of device tensors writes a file that a CPU client loads exactly."""
    from floral_flwr.client.state_store import StateDir, node_state_root

    torch.manual_seed(0)
    fm = Floral(_cnn(), num_adaptors=C, rank=2, alpha=ALPHA)
    randomize(fm, seed=5)
    fm.to(device)
    private = fm.private_state_dict()
    assert all(v.device.type == device for v in private.values())
    StateDir(tmp_path, "kind-a").save(dict(private), server_round=3)
    loaded = StateDir(tmp_path, "kind-a").load(before_round=4)
    assert loaded is not None and loaded.round == 3
    assert all(v.device.type == "cpu" for v in loaded.tensors.values())
    for k, v in private.items():
        assert torch.equal(loaded.tensors[k], v.cpu()), k
    cpu_model = Floral(_cnn(), num_adaptors=C, rank=2, alpha=ALPHA)
    cpu_model.load_shared_state_dict({k: v.cpu() for k, v in fm.shared_state_dict().items()})
    cpu_model.load_private_state_dict(loaded.tensors)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(cpu_model.eval()(x), fm.eval()(x.to(device)).cpu(), **_tol(device))


# ---------------------------------------------------------------- autocast

def _autocast_supported(device: str, dtype: torch.dtype) -> bool:
    if device == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_forward_backward_finite_and_close_to_fp32(device, dtype):
    """Under ``torch.autocast`` the adapted layers run in low precision; outputs and gradients
    stay finite, close to float32, and the parameters (and their gradients) stay float32."""
    if not _autocast_supported(device, dtype):
        pytest.skip(f"{dtype} autocast is not supported on this {device}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    fm = Floral(model, num_adaptors=4, rank=0.1, alpha=1.0)
    randomize(fm, scale=0.05)
    fm.to(device).train()
    x = torch.randn(32, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (32,), device=device)

    def run(autocast: bool):
        fm.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype, enabled=autocast):
            out = fm.model(x)  # noise-free p: the two runs see the same mixture
            loss = F.cross_entropy(out, y)
        loss.backward()
        return out, loss.detach(), {n: p.grad.detach().clone() for n, p in fm.named_parameters()}

    out32, loss32, g32 = run(False)
    out16, loss16, g16 = run(True)
    assert out16.dtype == dtype  # the layers really ran in low precision
    assert torch.isfinite(out16).all() and torch.isfinite(loss16)
    assert all(p.dtype == torch.float32 for p in fm.parameters())
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 0.05, f"output differs from float32 by {rel:.3g} (relative)"
    assert abs(loss16.item() - loss32.item()) < 0.05 * abs(loss32.item()) + 1e-3
    for n, g in g16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        cos = F.cosine_similarity(g.flatten().double(), g32[n].flatten().double(), dim=0)
        assert cos > 0.98, f"{n}: gradient cosine to float32 {cos:.4f}"


# ---------------------------------------------------------------- the ClientApp on the device

def _inline_cfg(tmp_path, name, device, **extra):
    return {"task": "digits-label-shift", "num-server-rounds": 2, "eval-every": 2, "fraction-train": 1.0,
            "fraction-evaluate": 1.0, "num-adaptors": 4, "mixture-noise": 0.0, "device": device,
            "output-dir": str(tmp_path), "run-name": name, **extra}


def _losses(tmp_path, name):
    rows = list(csv.DictReader((tmp_path / name / "rounds.csv").open()))
    return [float(r["train-loss"]) for r in rows]


def _setup_now():
    from floral_flwr.client import handlers
    return next(iter(handlers._SETUPS.values()))


@pytest.mark.parametrize("device", DEVICES)
def test_client_app_trains_and_evaluates_on_device(device, tmp_path):
    """The real ServerApp + ClientApp (in-process) with ``device=<device>``: the model lives on
    the device, the run completes, and (mixture noise off, CPU-seeded shuffles) train losses and
    the personalized accuracy equal the CPU run's; private state is written per client."""
    from floral_flwr.inline import run_inline

    torch.set_num_threads(1)
    state = tmp_path / "state"
    summary, grid = run_inline(_inline_cfg(tmp_path, "dev", device), 4,
                               node_config=lambda k: {"state-dir": str(state)})
    setup = _setup_now()
    assert setup.device.type == device
    assert {p.device.type for p in setup.handle.module.parameters()} == {device}
    assert summary["failures"] == 0 and summary["rejected"] == 0
    acc = summary["final"]["accuracy-mean"]
    assert 0.0 <= acc <= 1.0
    losses = _losses(tmp_path, "dev")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    if device != "cpu":  # the same run on the CPU is the reference
        cpu_summary, _ = run_inline(_inline_cfg(tmp_path, "cpu", "cpu"), 4)
        for a, b in zip(losses, _losses(tmp_path, "cpu")):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
        assert acc == pytest.approx(cpu_summary["final"]["accuracy-mean"], abs=0.02)
    # every client's private state (saved from device tensors) is on disk and loads on the CPU
    from floral_flwr.client.state_store import StateDir, node_state_root
    from floral_flwr.config import parse_run_config
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import task_info

    cfg = parse_run_config(_inline_cfg(tmp_path, "x", "cpu"))
    cpu_handle = build_handle(cfg, task_info(cfg.task, seed=cfg.seed).build_model)
    for k in range(4):
        saved = StateDir(node_state_root(state, "dev", k), cpu_handle.kind()).load()  # run dir "dev"
        assert saved is not None and saved.round == 2
        cpu_handle.load_private_state_dict(saved.tensors)
        got = cpu_handle.private_state_dict()["mixture.logits"]
        assert got.device.type == "cpu" and torch.equal(got, saved.tensors["mixture.logits"])
        assert not torch.equal(got, torch.zeros_like(got))  # trained, not the initial mixture


@pytest.mark.parametrize("device", DEVICES)
def test_client_app_mixed_precision_bf16(device, tmp_path):
    """``mixed-precision='bf16'``: autocast bf16 on CUDA (finite losses close to the float32
    run), ignored on the CPU (exactly the float32 run)."""
    from floral_flwr.inline import run_inline

    torch.set_num_threads(1)
    run_inline(_inline_cfg(tmp_path, "bf16", device, **{"mixed-precision": "bf16"}), 4)
    amp = _setup_now().handle.autocast_dtype
    run_inline(_inline_cfg(tmp_path, "fp32", device), 4)
    bf16, fp32 = _losses(tmp_path, "bf16"), _losses(tmp_path, "fp32")
    assert all(math.isfinite(v) for v in bf16)
    if device == "cuda":
        assert amp == torch.bfloat16
        for a, b in zip(bf16, fp32):
            assert a == pytest.approx(b, rel=0.05)
    else:
        assert amp is None
        assert bf16 == fp32
