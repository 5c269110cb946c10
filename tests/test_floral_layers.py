"""Per-layer correctness of the FLoRAL folds against naive references written here.

The reference runs, for every adaptor c, the two small layers the official code would run
(``layer_out_c(layer_in_c(x))``) from the tensors in ``fm.shared_state_dict()`` and mixes them
with ``softmax(logits / T)`` from ``fm.private_state_dict()``; it never calls the fold code.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from floral_flwr.floral import Floral

torch.set_num_threads(2)
ALPHA = 0.7
C = 3


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def randomize(fm: Floral, seed: int = 0, scale: float = 0.3) -> None:
    """Random nonzero adaptors (via the public state API) and random logits."""
    g = torch.Generator().manual_seed(seed)
    shared = {k: (torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * scale
                  if k.startswith("adaptor.") else v.clone())
              for k, v in fm.shared_state_dict().items()}
    fm.load_shared_state_dict(shared)
    private = fm.private_state_dict()
    private["mixture.logits"] = torch.randn(private["mixture.logits"].shape, generator=g).to(
        private["mixture.logits"].dtype)
    fm.load_private_state_dict(private)


def ref_probs(fm: Floral, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(fm.private_state_dict()["mixture.logits"] / temperature, -1)


# ---------------------------------------------------------------- conv option split (the spec)

def split(kernel, cin, cout, method):
    """(k_in, k_out, axes_in, axes_out): which layer carries which axis (spec, not the code)."""
    n = len(kernel)
    if method == "balanced_2d" and n == 1:
        method = "balanced"
    if method == "balanced_2d":
        ax_in = list(range(1, n))   # in-layer: width (2d) / last two axes (3d)
        ax_out = [0]                # out-layer: height (2d) / depth (3d)
    elif method == "in" or (method == "balanced" and cin <= cout):
        ax_in, ax_out = list(range(n)), []
    else:  # "out", or "balanced" with cin > cout
        ax_in, ax_out = [], list(range(n))
    k_in = tuple(kernel[a] if a in ax_in else 1 for a in range(n))
    k_out = tuple(kernel[a] if a in ax_out else 1 for a in range(n))
    return k_in, k_out, ax_in, ax_out


def axis_opts(main, axes, n, transposed=False):
    stride = _tuple(main.stride, n)
    dil = _tuple(main.dilation, n)
    opts = dict(stride=tuple(stride[a] if a in axes else 1 for a in range(n)),
                dilation=tuple(dil[a] if a in axes else 1 for a in range(n)), groups=main.groups)
    if transposed:
        pad = _tuple(main.padding, n)
        op = _tuple(main.output_padding, n)
        opts["padding"] = tuple(pad[a] if a in axes else 0 for a in range(n))
        opts["output_padding"] = tuple(op[a] if a in axes else 0 for a in range(n))
    return opts


def conv_padded(x, w, b, main, axes, n, kernel):
    """One conv of the pair: pads the axes it owns like the main layer, then convolves."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    opts = axis_opts(main, axes, n)
    if main.padding == "same":
        if not axes:
            return conv(x, w, b, padding=0, **opts)
        # 'same' on the owned axes only: pad like PyTorch (extra on the right), then valid conv.
        pads = []
        for a in reversed(range(n)):
            total = opts["dilation"][a] * (kernel[a] - 1) if a in axes else 0
            pads += [total // 2, total - total // 2]
        return conv(F.pad(x, pads), w, b, padding=0, **opts)
    pad = _tuple(main.padding, n)
    if main.padding_mode == "zeros":
        return conv(x, w, b, padding=tuple(pad[a] if a in axes else 0 for a in range(n)), **opts)
    pads = []
    for a in reversed(range(n)):
        p = pad[a] if a in axes else 0
        pads += [p, p]
    return conv(F.pad(x, pads, mode=main.padding_mode), w, b, padding=0, **opts)


def ref_conv(fm: Floral, main_state, main, x, method):
    n = len(main.kernel_size)
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    w, b = sd["base.0.weight"], sd.get("base.0.bias")
    base = conv_padded(x, w, b, main, list(range(n)), n, main.kernel_size)
    k_in, k_out, ax_in, ax_out = split(main.kernel_size, main.in_channels, main.out_channels, method)
    A, B, bias = sd["adaptor.0.in"], sd["adaptor.0.out"], sd.get("adaptor.0.bias")
    assert A.shape[3:] == k_in and B.shape[3:] == k_out
    out = base
    for c in range(A.shape[0]):
        h = conv_padded(x, A[c], None, main, ax_in, n, k_in)
        y = conv_padded(h, B[c], None if bias is None else bias[c], main, ax_out, n, k_out)
        out = out + ALPHA * p[c] * y
    return out


def ref_conv_transpose(fm: Floral, main, x, method):
    n = len(main.kernel_size)
    convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    out = convt(x, sd["base.0.weight"], sd.get("base.0.bias"), **axis_opts(main, range(n), n, True))
    k_in, k_out, ax_in, ax_out = split(main.kernel_size, main.in_channels, main.out_channels, method)
    A, B, bias = sd["adaptor.0.in"], sd["adaptor.0.out"], sd.get("adaptor.0.bias")
    for c in range(A.shape[0]):
        h = convt(x, A[c], None, **axis_opts(main, ax_in, n, True))
        y = convt(h, B[c], None if bias is None else bias[c], **axis_opts(main, ax_out, n, True))
        out = out + ALPHA * p[c] * y
    return out


CONV_CASES = [
    # (dims, cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode)
    (2, 3, 8, 3, 1, 0, 1, 1, True, "zeros"),
    (2, 4, 6, (3, 5), (2, 1), (1, 2), (1, 2), 2, True, "zeros"),
    (2, 6, 4, (5, 3), (1, 2), (2, 0), (2, 1), 1, False, "zeros"),
    (2, 4, 4, 3, 2, 1, 1, 4, True, "circular"),
    (2, 4, 5, 3, 1, 2, 1, 1, True, "reflect"),
    (2, 3, 4, (4, 3), 1, "same", (1, 2), 1, True, "zeros"),
    (1, 4, 6, 3, 2, 1, 2, 2, True, "zeros"),
    (1, 6, 3, 5, 1, 2, 1, 1, True, "replicate"),
    (3, 2, 4, (3, 1, 3), (1, 2, 1), 1, 1, 2, True, "zeros"),
    (3, 4, 2, 3, 1, (0, 1, 1), (1, 1, 2), 1, False, "zeros"),
]


@pytest.mark.parametrize("method", ["balanced_2d", "balanced", "in", "out"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-k{c[3]}-s{c[4]}-p{c[5]}-g{c[7]}-{c[9]}")
def test_conv_matches_two_layer_reference(case, method):
    n, cin, cout, k, s, pad, d, g, bias, mode = case
    torch.manual_seed(0)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    main = cls(cin, cout, k, stride=s, padding=pad, dilation=d, groups=g, bias=bias, padding_mode=mode)
    fm = Floral(nn.Sequential(main), num_adaptors=C, rank=2, alpha=ALPHA, conv_method=method).eval()
    randomize(fm)
    x = torch.randn(2, cin, *([9, 10, 8][:n]))
    y = fm(x)
    ref = ref_conv(fm, None, main, x, method)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert fm.adaptor_modules()["0"].rank % g == 0


CONVT_CASES = [
    # (dims, cin, cout, kernel, stride, padding, output_padding, dilation, groups, bias)
    (2, 3, 5, 3, 1, 0, 0, 1, 1, True),
    (2, 4, 6, (3, 2), (2, 3), (1, 0), (1, 2), 1, 2, True),
    (2, 6, 4, 3, 2, 1, 1, (1, 2), 1, False),
    (1, 4, 2, 4, 2, 1, 1, 1, 2, True),
    (3, 2, 4, (2, 3, 2), (1, 2, 1), (0, 1, 0), (0, 1, 0), 1, 1, True),
]


@pytest.mark.parametrize("method", ["balanced_2d", "balanced", "in", "out"])
@pytest.mark.parametrize("case", CONVT_CASES, ids=lambda c: f"{c[0]}d-k{c[3]}-s{c[4]}-g{c[8]}")
def test_conv_transpose_matches_two_layer_reference(case, method):
    n, cin, cout, k, s, pad, op, d, g, bias = case
    torch.manual_seed(0)
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n]
    main = cls(cin, cout, k, stride=s, padding=pad, output_padding=op, dilation=d, groups=g, bias=bias)
    fm = Floral(nn.Sequential(main), num_adaptors=C, rank=2, alpha=ALPHA, conv_method=method).eval()
    randomize(fm)
    x = torch.randn(2, cin, *([5, 6, 4][:n]))
    torch.testing.assert_close(fm(x), ref_conv_transpose(fm, main, x, method), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 64])
@pytest.mark.parametrize("compute", ["auto", "fold", "unfold"])
def test_linear_matches_reference(bias, rows, compute):
    torch.manual_seed(0)
    fm = Floral(nn.Sequential(nn.Linear(24, 16, bias=bias)), num_adaptors=C, rank=3, alpha=ALPHA,
                linear_compute=compute).eval()
    randomize(fm)
    x = torch.randn(rows, 24)
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    ref = F.linear(x, sd["base.0.weight"], sd.get("base.0.bias"))
    for c in range(C):
        b = sd["adaptor.0.bias"][c] if bias else None
        ref = ref + ALPHA * p[c] * F.linear(F.linear(x, sd["adaptor.0.in"][c]), sd["adaptor.0.out"][c], b)
    assert ("adaptor.0.bias" in sd) == bias
    torch.testing.assert_close(fm(x), ref, atol=1e-5, rtol=1e-5)
    # 3-d input (sequence): rows = batch * positions
    x3 = torch.randn(2, rows, 24)
    torch.testing.assert_close(fm(x3)[1], fm(x3[1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("rows", [4, 40])  # hidden side scaled (rows <= d_out) / bank side
def test_unfolded_linear_stack_matches_reference(per_layer, rows):
    """Two layers of different ranks share (or not) one mixture: the per-column scale
    (p_c repeated r times, built once per forward per rank) must be each layer's own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    fm = Floral(model, num_adaptors=C, rank=0.5, alpha=ALPHA, per_layer_mixture=per_layer,
                linear_compute="unfold").eval()
    randomize(fm)
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    ranks = {sd[f"adaptor.{i}.in"].shape[1] for i in (0, 2)}
    assert len(ranks) == 2  # the two layers have different ranks
    x = torch.randn(rows, 12)
    h = x
    for li, name in enumerate(("0", "2")):
        pl = p[li] if per_layer else p
        out = F.linear(h, sd[f"base.{name}.weight"], sd[f"base.{name}.bias"])
        for c in range(C):
            out = out + ALPHA * pl[c] * F.linear(F.linear(h, sd[f"adaptor.{name}.in"][c]),
                                                 sd[f"adaptor.{name}.out"][c], sd[f"adaptor.{name}.bias"][c])
        h = torch.relu(out) if li == 0 else out
    torch.testing.assert_close(fm(x), h, atol=1e-5, rtol=1e-5)


def test_linear_banks_are_2d_parameters_shown_per_adaptor():
    """A and B are stored as [A_1; ...; A_C] (C*r, d_in) and [B_1 | ... | B_C] (d_out, C*r);
    the state API shows A_c / B_c at index c, and writes through to the parameters."""
    import copy

    fm = Floral(nn.Sequential(nn.Linear(6, 5)), num_adaptors=C, rank=2, alpha=ALPHA)
    adaptor = fm.model[0].parametrizations.weight[0].adaptor
    a, b = adaptor._parameters["in"], adaptor._parameters["out"]
    assert a.shape == (C * 2, 6) and b.shape == (5, C * 2) and a.is_contiguous() and b.is_contiguous()
    randomize(fm)
    sd = fm.shared_state_dict()
    assert sd["adaptor.0.in"].shape == (C, 2, 6) and sd["adaptor.0.out"].shape == (C, 5, 2)
    for c in range(C):  # index c of the state = block c of the matrices
        assert torch.equal(sd["adaptor.0.in"][c], a[2 * c:2 * c + 2])
        assert torch.equal(sd["adaptor.0.out"][c], b[:, 2 * c:2 * c + 2])
    values = {k: v.contiguous().clone() for k, v in sd.items()}
    new = {k: v + 1.0 for k, v in values.items()}
    fm.load_shared_state_dict(new)
    assert torch.equal(a[2:4], new["adaptor.0.in"][1]) and torch.equal(b[:, 4:6], new["adaptor.0.out"][2])
    for other in (copy.deepcopy(fm), fm.to(torch.float64)):
        osd = other.shared_state_dict()
        for k in ("adaptor.0.in", "adaptor.0.out"):
            torch.testing.assert_close(osd[k].float(), new[k], rtol=0, atol=0)
    fm = fm.float()
    assert fm.model[0].parametrizations.weight[0].adaptor.num_adaptors == C
    for rows in (2, 30):  # auto: the unfolded product at 2 rows, the fold at 30
        fm.zero_grad()
        fm.train()(torch.randn(rows, 6)).square().sum().backward()
        grads = fm.model[0].parametrizations.weight[0].adaptor
        assert grads._parameters["in"].grad.shape == (C * 2, 6)
        assert grads._parameters["out"].grad.is_contiguous()


def test_embedding_matches_reference():
    torch.manual_seed(0)
    fm = Floral(nn.Sequential(nn.Embedding(11, 6, padding_idx=0)), num_adaptors=C, rank=2,
                alpha=ALPHA, adapt_embedding=True).eval()
    randomize(fm)
    idx = torch.randint(0, 11, (3, 5))
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    ref = F.embedding(idx, sd["base.0.weight"])
    for c in range(C):
        ref = ref + ALPHA * p[c] * F.linear(F.embedding(idx, sd["adaptor.0.in"][c]), sd["adaptor.0.out"][c])
    torch.testing.assert_close(fm(idx), ref, atol=1e-5, rtol=1e-5)


def _normalize(main, x):
    """The main layer's normalisation without affine (its own statistics, eval mode)."""
    if isinstance(main, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(x, main.running_mean, main.running_var, None, None, False, 0.0, main.eps)
    if isinstance(main, nn.modules.instancenorm._InstanceNorm):
        return F.instance_norm(x, eps=main.eps)
    if isinstance(main, nn.LayerNorm):
        return F.layer_norm(x, main.normalized_shape, None, None, main.eps)
    if isinstance(main, nn.GroupNorm):
        return F.group_norm(x, main.num_groups, None, None, main.eps)
    return F.rms_norm(x, main.normalized_shape, None, main.eps)


NORMS = [
    (lambda: nn.BatchNorm1d(5), (4, 5, 3)),
    (lambda: nn.BatchNorm2d(5), (4, 5, 3, 3)),
    (lambda: nn.BatchNorm3d(5), (2, 5, 2, 3, 2)),
    (lambda: nn.LayerNorm((3, 4)), (2, 5, 3, 4)),
    (lambda: nn.LayerNorm(4, bias=False), (2, 3, 4)),
    (lambda: nn.GroupNorm(2, 6), (2, 6, 3, 3)),
    (lambda: nn.InstanceNorm1d(5, affine=True), (2, 5, 7)),
    (lambda: nn.InstanceNorm2d(5, affine=True), (2, 5, 3, 3)),
    (lambda: nn.InstanceNorm3d(5, affine=True), (2, 5, 3, 2, 3)),
] + ([(lambda: nn.RMSNorm(4), (2, 3, 4))] if hasattr(nn, "RMSNorm") else [])


@pytest.mark.parametrize("make,shape", NORMS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_norm_matches_reference(make, shape):
    torch.manual_seed(0)
    main = make()
    with torch.no_grad():  # non-trivial main affine and statistics
        main.weight.uniform_(0.5, 1.5)
        if getattr(main, "bias", None) is not None:
            main.bias.normal_()
        if getattr(main, "running_var", None) is not None:
            main.running_mean.normal_()
            main.running_var.uniform_(0.5, 2)
    fm = Floral(nn.Sequential(main), num_adaptors=C, alpha=ALPHA, adapt_norm=True).eval()
    randomize(fm)
    x = torch.randn(shape)
    sd, p = fm.shared_state_dict(), ref_probs(fm)
    xhat = _normalize(main, x)
    view = (1, -1) + (1,) * (x.dim() - 2) if not isinstance(main, (nn.LayerNorm, nn.RMSNorm)) else (-1,)

    def affine(w, b):
        w = w.reshape(main.weight.shape)
        out = xhat * (w.view(view) if view != (-1,) else w)
        if b is not None:
            out = out + (b.view(view) if view != (-1,) else b.reshape(w.shape))
        return out

    ref = affine(sd["base.0.weight"], sd.get("base.0.bias"))
    for c in range(C):
        b = sd["adaptor.0.bias"][c] if "adaptor.0.bias" in sd else None
        ref = ref + ALPHA * p[c] * affine(sd["adaptor.0.weight"][c], b)
    torch.testing.assert_close(fm(x), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- gradcheck (float64)

GRAD_MODELS = [
    ("linear-auto", lambda: nn.Linear(5, 4), lambda: torch.randn(3, 5), {}),
    ("linear-fold", lambda: nn.Linear(5, 4), lambda: torch.randn(3, 5), {"linear_compute": "fold"}),
    ("linear-unfold", lambda: nn.Linear(5, 4), lambda: torch.randn(3, 5), {"linear_compute": "unfold"}),
    ("linear-unfold-3d", lambda: nn.Linear(5, 4), lambda: torch.randn(2, 3, 5), {"linear_compute": "unfold"}),
    # rows > d_out: p scales the bank instead of the hidden activations
    ("linear-unfold-tall", lambda: nn.Linear(5, 4), lambda: torch.randn(7, 5), {"linear_compute": "unfold"}),
    ("conv2d", lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), padding=1, groups=2), lambda: torch.randn(1, 2, 4, 5), {}),
    ("conv1d-in", lambda: nn.Conv1d(2, 3, 3, dilation=2), lambda: torch.randn(1, 2, 7), {"conv_method": "in"}),
    ("convT2d", lambda: nn.ConvTranspose2d(3, 2, (2, 3), stride=2), lambda: torch.randn(1, 3, 3, 2), {}),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), lambda: torch.randn(2, 4, 3), {"adapt_norm": True}),
]


@pytest.mark.parametrize("name,make,make_x,kw", GRAD_MODELS, ids=[g[0] for g in GRAD_MODELS])
def test_gradcheck(name, make, make_x, kw):
    torch.manual_seed(0)
    fm = Floral(nn.Sequential(make()).double(), num_adaptors=2, rank=2, **kw).eval()
    randomize(fm)
    names = [n for n, _ in fm.named_parameters() if "adaptor" in n or n == "mixture.logits"]
    params = dict(fm.named_parameters())
    x = make_x().double().requires_grad_(True)
    inputs = [x] + [params[n].detach().clone().requires_grad_(True) for n in names]

    def f(x, *ps):
        return torch.func.functional_call(fm, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-5)


def test_gradcheck_embedding():
    torch.manual_seed(0)
    fm = Floral(nn.Sequential(nn.Embedding(6, 3)).double(), num_adaptors=2, rank=2,
                adapt_embedding=True).eval()
    randomize(fm)
    names = [n for n, _ in fm.named_parameters() if "adaptor" in n or n == "mixture.logits"]
    params = dict(fm.named_parameters())
    idx = torch.tensor([[0, 3, 5], [2, 2, 1]])
    inputs = [params[n].detach().clone().requires_grad_(True) for n in names]

    def f(*ps):
        return torch.func.functional_call(fm, dict(zip(names, ps)), (idx,))

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-5)
