"""FLoRAL core: mixtures of low-rank adaptors folded into the weights (pure PyTorch, no flwr).

API: ``docs/contracts.md`` section 1. Layout: ``rank.py`` (rank rules), ``mixture.py`` (logits ->
p), ``adaptors.py`` (one class per layer kind with ``delta_weight(p)`` / ``delta_bias(p)`` and
the parametrizations), ``init.py`` (how the adaptors start), ``precondition.py`` (the official
scaled-GD gradients of the factors, optional), ``model.py`` (``Floral``: wrap, state dicts, merge,
report).

Deliberate deviations from the official code (github.com/zeligism/FLoRAL):

* Adaptive biases start *centred* (``adaptor_init="centered"``): drawn as the official code draws
  them (PyTorch's default bias init of its ``layer_out``), then minus their mean over the C
  adaptors. The adaptors differ from the start, as in the official code, so the mixtures get a
  gradient at once; but at the initial uniform mixture the biases sum to zero, so wrapping does not
  change the model's output (official: it adds the mean bias). ``"zero"`` (identical adaptors,
  our earlier default) misses the clusters at the paper's MNIST protocol; see ``init.py``.
  Norm-adaptor affines start at zero.
* ``balanced_2d`` splits non-square kernels exactly per axis: in (1, kw), out (kh, 1) (official:
  (1, min k)/(max k, 1) by channel counts, which changes the effective kernel and output shape).
  For 3d it uses in (1, kh, kw), out (kd, 1, 1) (official: falls back to ``balanced``).
* Conv adaptors use the main layer's ``padding_mode`` (official: always zero padding). The fold is
  exact for every mode because the two kernels act on disjoint axes or one is 1x1.
* The oracle mixture is exactly one-hot (official: softmax of [-100, 0, ...] then the 0.01 floor).
* Norm adaptors are the official ``normlora_reparam`` form with shared statistics: an extra
  affine per adaptor under the main layer's statistics (no separate running stats).
* An integer rank is clipped to full rank min(d_in, d_out); a float is always rho (1.0 = rho 1);
  grouped conv ranks are rounded up to a multiple of ``groups``.
* The entropy regulariser is ``entropy_penalty * H(softmax(theta / T))`` (noise-free, before the
  floor; mean over rows for per-layer mixtures); > 0 sharpens, as the official code really does.
* Sparse / ``max_norm`` embeddings, affine-less norms and other layer kinds are skipped and listed
  in ``parameter_report().skipped``. With ``padding_idx`` the padding row is adapted too (its
  adaptor rows get no gradient from that row, as for the base weight).

Practical notes: layers are parametrized in place, so use ``fm`` (not the bare model) for
forward passes; the training-time noise is drawn in ``Floral.forward`` (``fm.model(x)`` uses the
noise-free p). ``torch.save(fm)`` (pickling) is refused by ``torch.nn.utils.parametrize``: save
``fm.state_dict()`` or the shared/private state dicts. Do not call
``parametrize.remove_parametrizations`` on a deep copy of ``fm.model``: the copy shares the
injected ``Parametrized<cls>`` class; use ``fm.merge()``.
"""
from .adaptors import CONV_METHODS, split_kernel
from .mixture import Mixture
from .model import Floral, ParameterReport, is_adaptor_key
from .rank import resolve_rank

__all__ = ["Floral", "ParameterReport", "is_adaptor_key", "Mixture", "resolve_rank",
           "split_kernel", "CONV_METHODS"]
