"""Model-level behaviour of ``Floral``: wrapping, mixture, state dicts, merge, report, errors."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from floral_flwr.floral import Floral, ParameterReport, is_adaptor_key, resolve_rank
from floral_flwr.tasks.models import MLP, Cifar10CNN as TaskCifar10CNN

torch.set_num_threads(2)


class Cifar10CNN(TaskCifar10CNN):
    """The task's CIFAR-10 CNN plus a public method that must stay reachable through Floral."""

    def features(self, x):
        return self.conv1(x)


def mnist_nn() -> nn.Module:
    return MLP(784, 200, 10)  # the paper's MnistNN (the task model)


class Mixed(nn.Module):
    """Every supported kind plus unsupported ones (LSTM, affine-less BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.bn_plain = nn.BatchNorm1d(8, affine=False)
        self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)
        self.ln = nn.LayerNorm(4)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)
        h = self.bn_plain(self.bn(self.conv(h)))
        h = self.ln(self.up(h).transpose(1, 2))
        h, _ = self.lstm(h)
        return self.head(h)


def randomize(fm: Floral, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in fm.adaptor_modules().values():
            for t in a.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * scale)
        fm.mixture.logits.copy_(torch.randn(fm.mixture.logits.shape, generator=g))


ALL_KINDS = dict(adapt_embedding=True, adapt_norm=True)


@pytest.mark.parametrize("make,x,kw", [
    (Cifar10CNN, lambda: torch.randn(4, 3, 32, 32), {}),
    (mnist_nn, lambda: torch.randn(4, 1, 28, 28), {}),
    (Mixed, lambda: torch.randint(0, 20, (2, 6)), ALL_KINDS),
])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("init", ["zero", "centered"])
def test_wrapping_does_not_change_outputs(make, x, kw, train, init):
    # "zero": exactly, in both modes; "centered": at the uniform (eval, noise-free) mixture, up
    # to the rounding of sum_c b_c / C (training-time noise moves p off uniform: not checked)
    if init == "centered" and train:
        pytest.skip("centered adaptors act as soon as the noisy mixture leaves uniform")
    torch.manual_seed(0)
    model, inp = make(), x()
    ref = copy.deepcopy(model).train(train)
    fm = Floral(model, num_adaptors=3, rank=0.1, mixture_noise=1.0, adaptor_init=init, **kw).train(train)
    torch.manual_seed(1)
    expected = ref(inp)
    torch.manual_seed(1)
    got = fm(inp)
    if init == "zero":
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, atol=1e-5)


def test_state_keys_and_private_split():
    torch.manual_seed(0)
    model = Mixed()
    keys = list(model.state_dict().keys())
    fm = Floral(model, num_adaptors=3, rank=2, local_patterns=["bn.running_*"], **ALL_KINDS)
    shared, private = fm.shared_state_dict(), fm.private_state_dict()
    base = [k for k in shared if k.startswith("base.")]
    assert base == ["base." + k for k in keys if not k.startswith("bn.running_")]
    assert set(private) == {"mixture.logits", "local.bn.running_mean", "local.bn.running_var"}
    assert not any(k.startswith("mixture") for k in shared)
    adaptor_keys = [k for k in shared if is_adaptor_key(k)]
    assert adaptor_keys and all(shared[k].shape[0] == 3 for k in adaptor_keys)
    assert set(adaptor_keys) == {
        "adaptor.emb.in", "adaptor.emb.out", "adaptor.conv.in", "adaptor.conv.out",
        "adaptor.conv.bias", "adaptor.bn.weight", "adaptor.bn.bias", "adaptor.up.in",
        "adaptor.up.out", "adaptor.up.bias", "adaptor.ln.weight", "adaptor.ln.bias",
        "adaptor.head.in", "adaptor.head.out", "adaptor.head.bias"}
    assert private["mixture.logits"].shape == (3,)
    # shared = all params but the mixture
    n_shared = sum(p.numel() for p in fm.shared_parameters())
    assert n_shared + 3 == sum(p.numel() for p in fm.parameters())
    assert fm.mixture_parameters()[0] is fm.mixture.logits


def test_round_trip_into_fresh_copy_restores_outputs():
    torch.manual_seed(0)
    fm = Floral(Cifar10CNN(), num_adaptors=4, rank=0.1)
    randomize(fm)
    x = torch.randn(3, 3, 32, 32)
    fm.eval()
    y = fm(x)
    torch.manual_seed(123)  # a different initialisation
    other = Floral(Cifar10CNN(), num_adaptors=4, rank=0.1).eval()
    assert not torch.allclose(other(x), y)
    other.load_shared_state_dict({k: v.clone() for k, v in fm.shared_state_dict().items()})
    other.load_private_state_dict({k: v.clone() for k, v in fm.private_state_dict().items()})
    assert torch.equal(other(x), y)
    # numpy arrays (what the Flower glue holds) load too
    torch.manual_seed(7)
    third = Floral(Cifar10CNN(), num_adaptors=4, rank=0.1).eval()
    third.load_shared_state_dict({k: v.numpy().copy() for k, v in fm.shared_state_dict().items()})
    third.load_private_state_dict({k: v.numpy().copy() for k, v in fm.private_state_dict().items()})
    assert torch.equal(third(x), y)


def test_load_errors_name_the_keys():
    fm = Floral(mnist_nn(), num_adaptors=2, rank=2)
    sd = fm.shared_state_dict()
    missing = dict(sd)
    del missing["base.fc1.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['base.fc1.weight'\]"):
        fm.load_shared_state_dict(missing)
    extra = dict(sd, **{"base.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*base.bogus"):
        fm.load_shared_state_dict(extra)
    shaped = dict(sd, **{"adaptor.fc1.in": torch.zeros(3, 2, 784)})
    with pytest.raises(ValueError, match=r"adaptor.fc1.in: expected \(2, 2, 784\), got \(3, 2, 784\)"):
        fm.load_shared_state_dict(shaped)
    with pytest.raises(ValueError, match="unexpected keys.*mixture.logits"):
        fm.load_shared_state_dict(dict(sd, **fm.private_state_dict()))
    with pytest.raises(ValueError, match=r"mixture.logits: expected \(2,\), got \(4,\)"):
        fm.load_private_state_dict({"mixture.logits": torch.zeros(4)})
    with pytest.raises(ValueError, match="missing keys"):
        fm.load_private_state_dict({})


@pytest.mark.parametrize("make,x,kw", [
    (Cifar10CNN, lambda: torch.randn(4, 3, 32, 32), {}),
    (Cifar10CNN, lambda: torch.randn(4, 3, 32, 32), {"linear_compute": "fold", "prob_floor": 0.1}),
    (mnist_nn, lambda: torch.randn(4, 1, 28, 28), {"per_layer_mixture": True}),
    (Mixed, lambda: torch.randint(0, 20, (2, 6)), ALL_KINDS),
])
def test_merge_equals_wrapped(make, x, kw):
    torch.manual_seed(0)
    model = make()
    cls = type(model)
    fm = Floral(model, num_adaptors=3, rank=0.1, mixture_noise=1.0, **kw)
    randomize(fm)
    inp = x()
    fm.eval()
    y = fm(inp)
    merged = fm.merge()
    assert type(merged) is cls and not merged.training
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert not any("Parametrized" in type(m).__name__ for m in merged.modules())
    assert list(merged.state_dict()) == [k[len("base."):] for k in fm.shared_state_dict()
                                         if k.startswith("base.")]
    assert sum(p.numel() for p in merged.parameters()) == fm.parameter_report().base
    torch.testing.assert_close(merged(inp), y, atol=1e-5, rtol=1e-5)
    # merging must not break the wrapped model (the parametrized class is shared with the copy)
    assert torch.equal(fm(inp), y)
    fm.train()
    fm(inp).sum().backward()


def test_oracle_one_hot_and_frozen():
    torch.manual_seed(0)
    fm = Floral(mnist_nn(), num_adaptors=4, rank=2, mixture_noise=1.0, prob_floor=0.01)
    fm.set_oracle(2)
    assert torch.equal(fm.probs(), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    opt = torch.optim.SGD([{"params": fm.shared_parameters()},
                           {"params": fm.mixture_parameters(), "lr": 10.0}], lr=0.1)
    fm.train()
    for _ in range(2):
        opt.zero_grad()
        (fm(torch.randn(8, 1, 28, 28)).pow(2).mean() + fm.regularization_loss()).backward()
        opt.step()
    assert not fm.mixture.logits.requires_grad
    assert torch.equal(fm.probs(), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="cluster=4"):
        fm.set_oracle(4)


def _effective_p(fm: Floral, name: str, weight_used: torch.Tensor) -> torch.Tensor:
    """Solve W_used - W = alpha * sum_c p_c B_c A_c for p (least squares), for a Linear layer."""
    sd = fm.shared_state_dict()
    deltas = torch.stack([sd[f"adaptor.{name}.out"][c] @ sd[f"adaptor.{name}.in"][c]
                          for c in range(fm.num_adaptors)])  # (C, out, in)
    diff = (weight_used - sd[f"base.{name}.weight"]) / fm.alpha
    sol = torch.linalg.lstsq(deltas.flatten(1).T.double(), diff.flatten().double().unsqueeze(1))
    return sol.solution.squeeze(1).float()


def _record_weights(fm: Floral, names):
    seen = {}
    for n in names:
        fm.model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen.setdefault(n, []).append(mod.weight.detach().clone()))
    return seen


def test_noise_only_in_training_and_once_per_forward():
    torch.manual_seed(0)
    fm = Floral(mnist_nn(), num_adaptors=3, rank=3, mixture_noise=2.0, linear_compute="fold")
    randomize(fm, scale=1.0)
    seen = _record_weights(fm, ["fc1", "fc2"])
    x = torch.randn(2, 1, 28, 28)
    fm.train()
    fm(x)
    fm(x)
    p1a, p3a = _effective_p(fm, "fc1", seen["fc1"][0]), _effective_p(fm, "fc2", seen["fc2"][0])
    p1b = _effective_p(fm, "fc1", seen["fc1"][1])
    torch.testing.assert_close(p1a, p3a, atol=1e-4, rtol=0)  # same p in both layers
    assert (p1a - p1b).abs().max() > 1e-3  # fresh noise each forward
    clean = torch.softmax(fm.mixture.logits.detach(), -1)
    assert (p1a - clean).abs().max() > 1e-3
    # noise is U[0, noise): log p - theta = xi - const, so its spread is below noise = 2
    spread = (p1a.clamp_min(1e-8).log() - fm.mixture.logits.detach())
    assert 0 < spread.max() - spread.min() < 2.0 + 1e-3
    fm.eval()
    fm(x)
    torch.testing.assert_close(_effective_p(fm, "fc1", seen["fc1"][2]), clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(fm.probs(), clean)


def test_per_layer_mixture_rows():
    torch.manual_seed(0)
    fm = Floral(mnist_nn(), num_adaptors=3, rank=3, per_layer_mixture=True, linear_compute="fold")
    randomize(fm, scale=1.0)
    assert fm.mixture.logits.shape == (2, 3) and fm.layer_names == ["fc1", "fc2"]
    seen = _record_weights(fm, ["fc1", "fc2"])
    fm.eval()
    fm(torch.randn(2, 1, 28, 28))
    p = torch.softmax(fm.mixture.logits.detach(), -1)
    torch.testing.assert_close(_effective_p(fm, "fc1", seen["fc1"][0]), p[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(_effective_p(fm, "fc2", seen["fc2"][0]), p[1], atol=1e-4, rtol=0)


def test_prob_floor_temperature_and_entropy():
    fm = Floral(mnist_nn(), num_adaptors=4, rank=2, prob_floor=0.05, temperature=2.0,
                entropy_penalty=0.3)
    with torch.no_grad():
        fm.mixture.logits.copy_(torch.tensor([20.0, 0.0, 0.0, 0.0]))
    p = fm.probs()
    raw = torch.softmax(fm.mixture.logits.detach() / 2.0, -1)
    torch.testing.assert_close(p, raw.clamp(min=0.05))  # clamped, not renormalised
    assert p.sum() > 1.0
    h = -(raw * raw.log()).sum()
    torch.testing.assert_close(fm.regularization_loss(), 0.3 * h)
    fm.regularization_loss().backward()  # differentiable w.r.t. the logits
    assert fm.mixture.logits.grad is not None
    # > 0 penalty sharpens: a gradient step on it lowers the entropy
    before = fm.regularization_loss().item()
    with torch.no_grad():
        fm.mixture.logits -= 1.0 * fm.mixture.logits.grad
    assert fm.regularization_loss().item() < before
    off = Floral(mnist_nn(), num_adaptors=4, rank=2)
    assert off.regularization_loss().item() == 0.0


@pytest.mark.parametrize("kwargs,param", [
    ({"num_adaptors": 0}, "num_adaptors=0"),
    ({"rank": 0}, "rank=0"),
    ({"rank": -2}, "rank=-2"),
    ({"rank": "huge"}, "rank='huge'"),
    ({"rank": 1.5}, "rank=1.5"),
    ({"rank": 0.0}, "rank=0.0"),
    ({"conv_method": "diagonal"}, "conv_method='diagonal'"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"mixture_noise": -1.0}, "mixture_noise=-1.0"),
    ({"prob_floor": -0.1}, "prob_floor=-0.1"),
    ({"prob_floor": 0.3, "num_adaptors": 4}, "prob_floor=0.3"),
    ({"min_rank": 0}, "min_rank=0"),
    ({"linear_compute": "maybe"}, "linear_compute='maybe'"),
])
def test_bad_input(kwargs, param):
    with pytest.raises(ValueError, match=r"allowed") as err:
        Floral(mnist_nn(), **kwargs)
    assert param in str(err.value)


def test_no_adaptable_layer():
    with pytest.raises(ValueError, match="no adaptable layer"):
        Floral(nn.Sequential(nn.LSTM(3, 3)))
    with pytest.raises(ValueError, match="no adaptable layer"):
        Floral(mnist_nn(), adapt_linear=False)
    with pytest.raises(ValueError, match="no adaptable layer"):
        Floral(mnist_nn(), exclude="*")


def test_include_exclude_and_skipped():
    fm = Floral(Mixed(), num_adaptors=2, rank=1, exclude=["head"], **ALL_KINDS)
    rep = fm.parameter_report()
    assert [n for n, _, _ in rep.layers] == ["emb", "conv", "bn", "up", "ln"]
    assert ("bn_plain", "BatchNorm1d") in rep.skipped
    assert ("lstm", "LSTM") in rep.skipped and ("head", "Linear") in rep.skipped
    fm2 = Floral(Cifar10CNN(), num_adaptors=2, rank=1, include="fc*")
    assert [n for n, _, _ in fm2.parameter_report().layers] == ["fc1", "fc2"]


def test_rank_rules():
    assert resolve_rank(0.1, 784, 200) == 15 and resolve_rank(0.1, 200, 10) == 1
    assert resolve_rank(1.0, 784, 200) == int(784 * 200 / 984)  # float 1.0 is rho
    assert resolve_rank(1, 784, 200) == 1                        # int 1 is rank 1
    assert resolve_rank(500, 784, 200) == 200                     # clipped to full rank
    assert resolve_rank("full", 30, 7) == 7
    assert resolve_rank("sqrt", 30, 17) == 4
    assert resolve_rank("log", 30, 17) == 4
    assert resolve_rank(0.01, 3, 4, min_rank=2) == 2
    assert resolve_rank(3, 64, 64, groups=4) == 4                 # rounded up to groups
    assert resolve_rank("4", 64, 64) == 4 and resolve_rank("0.5", 10, 10) == 2


def test_parameter_report_hand_counts():
    # MnistNN 784-200-10, C = 4 (floral-method.md section 5.3 / params.py)
    rep = Floral(mnist_nn(), num_adaptors=4, rank=0.01).parameter_report()
    assert rep.base == 784 * 200 + 200 + 200 * 10 + 10 == 159_010
    # rho = 0.01: r = [1, 1]; per adaptor 784+200+200 + 200+10+10
    assert rep.adaptors + rep.mixture == 4 * (784 + 200 + 200 + 200 + 10 + 10) + 4 == 5_620
    rep = Floral(mnist_nn(), num_adaptors=4, rank=0.1).parameter_report()
    assert [r for _, _, r in rep.layers] == [15, 1]
    assert rep.adaptors + rep.mixture == 4 * (784 * 15 + 15 * 200 + 200 + 220) + 4 == 60_724
    assert rep.mixture == 4
    assert rep.overhead_vs_base_pct == pytest.approx(100 * 60_724 / 159_010)
    assert rep.overhead_vs_ensemble_pct == pytest.approx(100 * 60_724 / (3 * 159_010))
    assert rep.bytes_up == rep.bytes_down == 4 * (159_010 + 60_720)
    # Cifar10CNN, C = 4, rho = 0.1: ranks [1, 6, 6, 1] with balanced_2d split kernels
    rep = Floral(Cifar10CNN(), num_adaptors=4, rank=0.1).parameter_report()
    assert rep.base == 87_178
    assert [(k, r) for _, k, r in rep.layers] == [("conv2d", 1), ("conv2d", 6), ("linear", 6),
                                                   ("linear", 1)]
    per = (3 * 1 * 5 + 1 * 32 * 5 + 32) + (32 * 6 * 3 + 6 * 64 * 3 + 64) + (1024 * 6 + 6 * 64 + 64) + (64 + 10 + 10)
    assert rep.adaptors + rep.mixture == 4 * per + 4 == 34_704
    rep = Floral(Cifar10CNN(), num_adaptors=4, rank=0.01).parameter_report()
    assert rep.adaptors + rep.mixture == 7_184
    assert isinstance(rep, ParameterReport) and "base=87,178" in str(rep)
    assert rep.as_dict()["layers"][0] == ("conv1", "conv2d", 1)
    one = Floral(mnist_nn(), num_adaptors=1, rank=1).parameter_report()
    assert one.overhead_vs_ensemble_pct == math.inf


def test_attribute_delegation_deepcopy_and_dtype():
    torch.manual_seed(0)
    fm = Floral(Cifar10CNN(), num_adaptors=2, rank=0.1)
    randomize(fm)
    x = torch.randn(2, 3, 32, 32)
    assert fm.features(x).shape == (2, 32, 28, 28)  # public method of the model
    assert fm.conv1 is fm.model.conv1
    with pytest.raises(AttributeError):
        fm.does_not_exist
    fm.eval()
    y = fm(x)
    twin = copy.deepcopy(fm)
    assert torch.equal(twin(x), y)
    with torch.no_grad():
        twin.mixture.logits[0] += 1.0
    assert torch.equal(fm(x), y) and not torch.equal(twin(x), y)
    fm64 = copy.deepcopy(fm).to(torch.float64)
    assert fm64.mixture.logits.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in fm64.parameters())
    torch.testing.assert_close(fm64(x.double()).float(), y, atol=1e-5, rtol=1e-4)
    # moving the inner model alone also moves the adaptors (they live in its parametrizations)
    fm.model.to(torch.float64)
    assert all(a.dtype == torch.float64 for a in fm.shared_state_dict().values()
               if a.is_floating_point())


@pytest.mark.parametrize("compute", ["auto", "fold"])
def test_autocast_bf16_cpu(compute):
    torch.manual_seed(0)
    fm = Floral(Cifar10CNN(), num_adaptors=4, rank=0.1, mixture_noise=1.0, linear_compute=compute)
    randomize(fm)
    x = torch.randn(4, 3, 32, 32)
    fm.eval()
    ref = fm(x)
    fm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fm(x)
        loss = y.float().pow(2).mean()
    loss.backward()
    assert y.dtype == torch.bfloat16
    assert all(p.grad is not None for p in fm.parameters() if p.requires_grad)
    fm.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fm(x)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


def _compile_check(backend: str) -> None:
    torch.manual_seed(0)
    fm = Floral(Cifar10CNN(), num_adaptors=3, rank=0.1)
    randomize(fm)
    fm.train()
    x = torch.randn(4, 3, 32, 32)
    y = fm(x)
    y.pow(2).mean().backward()
    grads = [p.grad.clone() for p in fm.parameters()]
    fm.zero_grad()
    compiled = torch.compile(fm, backend=backend)
    yc = compiled(x)
    yc.pow(2).mean().backward()
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
    for p, g in zip(fm.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_torch_compile_traces():
    """torch.compile(fm) (dynamo + AOT autograd; no C++ codegen to stay fast) == eager."""
    _compile_check("aot_eager")


@pytest.mark.skipif(os.environ.get("FLORAL_SLOW_TESTS") != "1",
                    reason="inductor C++ codegen takes ~30 s on 2 cores; set FLORAL_SLOW_TESTS=1")
def test_torch_compile_inductor():
    _compile_check("inductor")


class TinyLM(nn.Module):
    """Tied embedding/decoder, an attention block whose out_proj weight is read directly and a
    projection called with a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 10, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.dec(self.proj(input=h))  # keyword call of an adapted Linear


def test_tied_weights_attention_and_keyword_calls():
    torch.manual_seed(0)
    model = TinyLM()
    keys = list(model.state_dict())
    idx = torch.randint(0, 10, (2, 5))
    expected = model(idx)
    fm = Floral(model, num_adaptors=2, rank=2)
    # centred adaptor biases: unchanged at the uniform mixture up to the rounding of their mean
    torch.testing.assert_close(fm(idx), expected, atol=1e-6, rtol=0)
    rep = fm.parameter_report()
    # the tied decoder is not adapted (that would untie it): listed with its partner
    assert [n for n, _, _ in rep.layers] == ["attn.out_proj", "proj"]
    assert ("attn", "MultiheadAttention") in rep.skipped and ("emb", "Embedding") in rep.skipped
    assert ("dec", "Linear (tied to emb)") in rep.skipped
    # one tensor, one key on the wire: the tied duplicate 'dec.weight' is not sent twice
    assert [k for k in fm.shared_state_dict() if k.startswith("base.")] == [
        "base." + k for k in keys if k != "dec.weight"]
    assert rep.base == sum(p.numel() for p in TinyLM().parameters())  # tied weight counted once
    randomize(fm, scale=0.5)
    fm.eval()
    y = fm(idx)
    assert not torch.allclose(y, expected)
    with torch.no_grad():  # the attention's out_proj adaptor is live (MHA reads .weight directly)
        fm.mixture.logits.zero_()
        fm.model.attn.out_proj.parametrizations.weight[0].adaptor._parameters["out"].zero_()
        fm.model.attn.out_proj.parametrizations.bias[0]._adaptor_ref[0]._parameters["bias"].zero_()
    y_no_attn = fm(idx)
    randomize(fm, scale=0.5)
    assert not torch.allclose(fm(idx), y_no_attn)
    merged = fm.merge()
    torch.testing.assert_close(merged(idx), fm(idx), atol=1e-5, rtol=1e-5)
    assert merged.dec.weight is merged.emb.weight  # still tied
    assert sum(p.numel() for p in merged.parameters()) == rep.base


def test_state_dicts_follow_tensors_replaced_by_to():
    """``.to()`` swaps buffers for new tensors: state dicts must see the live ones, not stale refs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    fm = Floral(model, num_adaptors=2, rank=1)
    fm.shared_state_dict()  # resolve (and cache) the key -> tensor lookup
    fm.to(torch.float64)
    sd = fm.shared_state_dict()
    assert sd["base.1.running_mean"].dtype == torch.float64
    assert sd["base.1.running_mean"].data_ptr() == model[1].running_mean.data_ptr()
    new = {k: v.clone() for k, v in sd.items()}
    new["base.1.running_mean"] = torch.full((6,), 3.0, dtype=torch.float64)
    fm.load_shared_state_dict(new)
    assert torch.equal(model[1].running_mean, torch.full((6,), 3.0, dtype=torch.float64))


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward (reads self.weight): must keep that forward."""

    def forward(self, x):
        return 2.0 * nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("compute", ["auto", "fold", "unfold"])
def test_direct_linear_forward_equals_the_parametrized_weight_and_subclass_forward_is_kept(compute):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), ScaledLinear(30, 5))
    fm = Floral(model, num_adaptors=3, rank=2, alpha=0.7, linear_compute=compute)
    randomize(fm, scale=0.5)
    fm.eval()
    x = torch.randn(6, 12)
    # independent computation: the folded weights read through the parametrization (what any
    # external reader of .weight sees), applied with plain F.linear
    lin, sub = fm.model[0], fm.model[2]
    h = torch.relu(nn.functional.linear(x, lin.weight, lin.bias))
    ref = 2.0 * nn.functional.linear(h, sub.weight, sub.bias)
    torch.testing.assert_close(fm(x), ref, atol=1e-5, rtol=1e-5)
    assert type(sub).forward is ScaledLinear.forward  # the subclass's own forward survives
    assert type(lin).forward is not nn.Linear.forward  # the plain Linear got the direct path
    merged = fm.merge()
    assert type(merged[0]) is nn.Linear and type(merged[2]) is ScaledLinear
    torch.testing.assert_close(merged(x), ref, atol=1e-5, rtol=1e-5)
