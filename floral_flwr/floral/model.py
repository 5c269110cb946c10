# size: the Floral wrapper is one class (wrap, state split, mixture, merge); its parts share private caches.
"""``Floral``: wrap any ``nn.Module`` with C mixture-weighted adaptors per layer.

See ``docs/contracts.md`` section 1 for the public API. The layers of the wrapped model are
parametrized *in place* (``torch.nn.utils.parametrize``): their ``weight``/``bias`` become
``W + alpha * sum_c p_c delta_c`` with p read from a per-forward context, so there is no Python
loop over adaptors and no forward hooks. Plain ``nn.Linear`` layers also get a direct forward
(``adaptors.linear_forward``) that skips the parametrization's per-access overhead and can add
the low-rank product beside the base layer instead of folding it (``linear_compute``).
"""
from __future__ import annotations

import copy
import fnmatch
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adaptors import (CONV_METHODS, Adaptor, BiasFold, WeightFold, find_factory, linear_forward,
                       unsupported_reason)
from .init import ADAPTOR_INITS, init_adaptor_
from .mixture import Mixture, MixtureContext
from .precondition import install_preconditioner
from .rank import RankSpec, validate_rank

LINEAR_COMPUTE = ("auto", "fold", "unfold")


def is_adaptor_key(key: str) -> bool:
    """True for shared-state keys of adaptor banks (leading dim C)."""
    return key.startswith("adaptor.")


@dataclass
class ParameterReport:
    """Parameter and communication accounting of a :class:`Floral` model.

    ``overhead_vs_base_pct`` = (adaptors + mixture) / base * 100;
    ``overhead_vs_ensemble_pct`` = (adaptors + mixture) / ((C - 1) * base) * 100 (``inf`` for
    C = 1); ``bytes_up`` = ``bytes_down`` = 4 * number of entries of the shared state (float32;
    includes buffers such as BatchNorm running stats). ``layers``: (name, kind, rank) with rank
    ``None`` for norm adaptors. ``skipped``: (name, type name) of modules that own parameters
    (or are norms without affine when ``adapt_norm``) and were not wrapped; a layer whose weight
    is tied to another module's (tied embeddings) is listed as ``"<type> (tied to <name>)"``.
    ``frozen``: base parameters frozen by :meth:`Floral.freeze_base` (never on the wire).
    """

    base: int
    adaptors: int
    mixture: int
    overhead_vs_base_pct: float
    overhead_vs_ensemble_pct: float
    bytes_up: int
    bytes_down: int
    num_adaptors: int = 0
    frozen: int = 0
    layers: List[Tuple[str, str, Optional[int]]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"FLoRAL parameters (C={self.num_adaptors}): base={self.base:,} "
            f"adaptors={self.adaptors:,} mixture={self.mixture:,} "
            f"(+{self.overhead_vs_base_pct:.2f}% of base, "
            f"{self.overhead_vs_ensemble_pct:.2f}% of a C-model ensemble's extra)",
            f"  bytes per round: up={self.bytes_up:,} down={self.bytes_down:,}"
            + (f" (frozen base: {self.frozen:,} parameters not sent)" if self.frozen else ""),
        ]
        lines += [f"  {name or '<root>'}: {kind} rank={rank}" for name, kind, rank in self.layers]
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{n or '<root>'} ({t})" for n, t in self.skipped))
        return "\n".join(lines)


def _patterns(value: Union[None, str, Iterable[str]], name: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is invalid; allowed: None, a str or a list of "
                         f"fnmatch patterns") from None
    if not all(isinstance(v, str) for v in out):
        raise ValueError(f"{name}={value!r} is invalid; allowed: None, a str or a list of str")
    return out


def _match(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _check_patterns_match(model: nn.Module, patterns: Optional[Sequence[str]], what: str) -> None:
    """A pattern that names no module at all is a typo (or the wrong architecture): say so,
    with module names of this model to copy from."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns or ():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"{what} pattern {pattern!r} matches no module of {type(model).__name__}; allowed: "
                f"fnmatch patterns on module names (model.named_modules()), e.g. '*.query' for "
                f"BERT-style or '*.q_proj' for Llama-style attention" + _name_examples(model, None))


def _name_examples(model: nn.Module, flags: Optional[Dict[str, bool]]) -> str:
    """'; its layers include ...': a few adaptable module names of ``model``."""
    every = dict(adapt_linear=True, adapt_conv=True, adapt_conv_transpose=True,
                 adapt_embedding=True, adapt_norm=True)
    names = [n for n, m in model.named_modules() if n and find_factory(m, flags or every) is not None]
    if not names:
        return ""
    shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
    return f"; its adaptable layers are named {shown}"


def _tensor_owners(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> the names (``module.param``) under which modules hold it."""
    owners: Dict[int, List[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


def _tied_partner(name: str, module: nn.Module, owners: Dict[int, List[str]]) -> Optional[str]:
    """The other owner of this module's weight or bias when it is tied, else None."""
    for pname in ("weight", "bias"):
        p = module._parameters.get(pname)
        if p is None:
            continue
        me = f"{name}.{pname}" if name else pname
        others = [o for o in owners.get(id(p), []) if o != me]
        if others:
            return others[0].rpartition(".")[0] or others[0]
    return None


def _tied_aliases(model: nn.Module, keys: Sequence[str]) -> Dict[str, str]:
    """state_dict key -> the first key holding the same tensor (only for the later keys)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for k in keys:
        t = tensors.get(k)
        if t is None:
            continue
        if id(t) in first:
            aliases[k] = first[id(t)]
        else:
            first[id(t)] = k
    return aliases


class Floral(nn.Module):
    """FLoRAL wrapper: ``out_l = base_l(x) + alpha * sum_c p_c adaptor_{l,c}(x)`` per layer.

    Args (see ``docs/contracts.md`` section 1):
        model: any ``nn.Module``; its supported layers are parametrized **in place**.
        num_adaptors: C >= 1.
        rank: int >= 1 | float rho in (0, 1] | "sqrt" | "log" | "full" (see ``rank.py``).
        alpha: adaptor scale (no alpha/r scaling, as in the official code).
        conv_method: "balanced_2d" | "balanced" | "in" | "out" (see ``adaptors.split_kernel``).
        adaptive_bias: per-adaptor bias where the base layer has a bias.
        adaptor_init: how the per-adaptor biases start, "centered" (default: random, summing to
            zero over the C adaptors, so the adaptors differ but the output at the uniform
            mixture is the base model's) | "official" (random) | "zero" (identical adaptors);
            see ``init.py``.
        precondition: rescale the factors' gradients as the official trainer does
            (``(B^T B + eps I)^-1 g_A``, ``g_B (A A^T + eps I)^-1``; see ``precondition.py``),
            with ``eps = precond_eps``.
        temperature, mixture_noise, prob_floor: see ``mixture.py``.
        entropy_penalty: ``regularization_loss() = entropy_penalty * H(p)``, H in nats of the
            noise-free softmax (mean over rows for per-layer mixtures). Add it to the loss:
            > 0 *minimises* entropy (sharpens p toward one-hot, as the official ``router_entropy``
            really does), < 0 flattens it.
        per_layer_mixture: logits (L, C), layer l (in ``named_modules`` order) uses row l.
        local_patterns: fnmatch patterns on base state keys kept private (``local.<key>``).
        linear_compute: "auto" (default) | "fold" | "unfold". Linear layers either fold the
            adaptors into the weight or run ``x @ A^T`` / ``@ (B p)^T`` beside the base layer;
            "auto" picks per call the cheaper one (unfold when rows*(d_in+d_out) < d_in*d_out).
            State dicts and ``merge`` are identical in all modes.
    """

    def __init__(
        self,
        model: nn.Module,
        num_adaptors: int = 4,
        rank: RankSpec = 0.1,
        alpha: float = 1.0,
        min_rank: int = 1,
        adapt_linear: bool = True,
        adapt_conv: bool = True,
        adapt_conv_transpose: bool = True,
        adapt_embedding: bool = False,
        adapt_norm: bool = False,
        conv_method: str = "balanced_2d",
        adaptive_bias: bool = True,
        include: Union[None, str, Iterable[str]] = None,
        exclude: Union[None, str, Iterable[str]] = None,
        temperature: float = 1.0,
        mixture_noise: float = 0.0,
        prob_floor: float = 0.0,
        entropy_penalty: float = 0.0,
        per_layer_mixture: bool = False,
        local_patterns: Union[str, Iterable[str]] = (),
        linear_compute: str = "auto",
        adaptor_init: str = "centered",
        precondition: bool = False,
        precond_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        # ---- validation (ValueError naming parameter, value and allowed values)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is invalid; allowed: an nn.Module")
        if isinstance(num_adaptors, bool) or not isinstance(num_adaptors, int) or num_adaptors < 1:
            raise ValueError(f"num_adaptors={num_adaptors!r} is invalid; allowed: int >= 1")
        rank = validate_rank(rank)
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
            raise ValueError(f"min_rank={min_rank!r} is invalid; allowed: int >= 1")
        if conv_method not in CONV_METHODS:
            raise ValueError(f"conv_method={conv_method!r} is invalid; allowed: {CONV_METHODS}")
        if adaptor_init not in ADAPTOR_INITS:
            raise ValueError(f"adaptor_init={adaptor_init!r} is invalid; allowed: {ADAPTOR_INITS}")
        if not isinstance(precondition, bool):
            raise ValueError(f"precondition={precondition!r} is invalid; allowed: True or False")
        if (isinstance(precond_eps, bool) or not isinstance(precond_eps, (int, float))
                or not math.isfinite(precond_eps) or precond_eps <= 0):
            raise ValueError(f"precond_eps={precond_eps!r} is invalid; allowed: a finite float > 0")
        if linear_compute not in LINEAR_COMPUTE:
            raise ValueError(f"linear_compute={linear_compute!r} is invalid; allowed: {LINEAR_COMPUTE}")
        for pname, value in (("alpha", alpha), ("temperature", temperature),
                             ("mixture_noise", mixture_noise), ("prob_floor", prob_floor),
                             ("entropy_penalty", entropy_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{pname}={value!r} is invalid; allowed: a finite float")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature!r} is invalid; allowed: float > 0")
        if mixture_noise < 0:
            raise ValueError(f"mixture_noise={mixture_noise!r} is invalid; allowed: float >= 0")
        if prob_floor < 0 or prob_floor * num_adaptors > 1:
            raise ValueError(f"prob_floor={prob_floor!r} is invalid with num_adaptors={num_adaptors}; "
                             f"allowed: 0 <= prob_floor <= 1/num_adaptors = {1 / num_adaptors:g}")
        include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
        local_p = _patterns(local_patterns, "local_patterns") or ()

        self.num_adaptors = num_adaptors
        self.rank_spec = rank
        self.alpha = float(alpha)
        self.entropy_penalty = float(entropy_penalty)
        self.linear_compute = linear_compute
        self.local_patterns = local_p
        self.adaptor_init = adaptor_init
        self.precondition = precondition
        self._precond_handles: List[Any] = []

        # ---- the unwrapped model's state keys and parameter count (before parametrizing)
        self._base_keys: List[str] = list(model.state_dict().keys())
        self._base_numel = sum(p.numel() for p in model.parameters())
        # tied weights (one tensor under several keys, e.g. a language model's input embedding
        # and output layer): the state dicts carry each tensor once, under its first key
        self._aliases: Dict[str, str] = _tied_aliases(model, self._base_keys)
        owners = _tensor_owners(model)

        # ---- choose layers
        flags = dict(adapt_linear=adapt_linear, adapt_conv=adapt_conv,
                     adapt_conv_transpose=adapt_conv_transpose,
                     adapt_embedding=adapt_embedding, adapt_norm=adapt_norm)
        _check_patterns_match(model, include_p, "include")
        _check_patterns_match(model, exclude_p, "exclude")
        chosen: List[Tuple[str, nn.Module, Any]] = []
        skipped: List[Tuple[str, str]] = []
        for name, module in model.named_modules():
            factory = find_factory(module, flags)
            wanted = (factory is not None and (include_p is None or _match(name, include_p))
                      and not _match(name, exclude_p))
            tied = _tied_partner(name, module, owners)
            if wanted and tied is not None:
                # skipped (and listed) when a wildcard selects it; an error when named exactly
                if name in (include_p or ()):
                    raise ValueError(
                        f"include={include!r} selects {name!r}, whose weight is tied to "
                        f"{tied!r}: adapting it would untie the two (merge() could not give the "
                        f"base architecture back); allowed: layers whose weights are their own "
                        f"(exclude {name!r})")
                skipped.append((name, f"{type(module).__name__} (tied to {tied})"))
            elif wanted and unsupported_reason(module) is None:
                chosen.append((name, module, factory))
            elif any(True for _ in module.parameters(recurse=False)) or (
                    factory is not None and unsupported_reason(module) is not None):
                skipped.append((name, type(module).__name__))
        if not chosen:
            raise ValueError(
                f"model={type(model).__name__} has no adaptable layer with the given settings "
                f"({', '.join(f'{k}={v}' for k, v in flags.items())}, include={include!r}, "
                f"exclude={exclude!r}); allowed: a model with nn.Linear / Conv / ConvTranspose / "
                f"Embedding / affine norm layers enabled by the adapt_* flags"
                + _name_examples(model, flags))
        self.skipped = skipped

        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.mixture = Mixture(num_adaptors, len(chosen) if per_layer_mixture else None,
                               temperature=temperature, noise=mixture_noise, floor=prob_floor,
                               dtype=ref.dtype if ref is not None else None,
                               device=ref.device if ref is not None else None)
        self._ctx = MixtureContext(self.mixture)

        # ---- build adaptors and install the folds
        self._layers: List[Tuple[str, str, Tuple[str, ...]]] = []  # (name, kind, folded tensors)
        self._param_order: Dict[str, List[str]] = {}  # module's own parameter names, in order
        self._key_map: Dict[str, str] = {k: k for k in self._base_keys}  # base key -> wrapped key
        for index, (name, module, factory) in enumerate(chosen):
            adaptor: Adaptor = factory(module, num_adaptors=num_adaptors, rank=rank,
                                       min_rank=min_rank, adaptive_bias=adaptive_bias,
                                       conv_method=conv_method)
            init_adaptor_(adaptor, adaptor_init)
            if precondition:
                self._precond_handles += install_preconditioner(adaptor, float(precond_eps))
            self._param_order[name] = list(module._parameters.keys())
            own_forward = type(module).forward
            fold = WeightFold(adaptor, self._ctx, index, self.alpha)
            parametrize.register_parametrization(module, "weight", fold, unsafe=True)
            tensors = ["weight"]
            if adaptor.bank("bias") is not None:
                parametrize.register_parametrization(
                    module, "bias", BiasFold(adaptor, self._ctx, index, self.alpha), unsafe=True)
                tensors.append("bias")
            if isinstance(module, nn.Linear) and own_forward is nn.Linear.forward:
                # parametrize gave the module a class of its own: give that class the direct
                # forward (a subclass with its own forward keeps it and reads the folded .weight)
                fold.linear_compute = linear_compute
                type(module).forward = linear_forward
            prefix = f"{name}." if name else ""
            for t in tensors:
                self._key_map[prefix + t] = f"{prefix}parametrizations.{t}.original"
            self._layers.append((name, adaptor.kind, tuple(tensors)))
        self.model = model

    # ------------------------------------------------------------------ forward & delegation
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # One p per forward pass: every adapted layer reads the same (noisy in training) p.
        self._ctx.p = self.mixture(noise=self.training)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._ctx.p = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)

    # ------------------------------------------------------------------ parameters & mixture
    def adaptor_modules(self) -> "OrderedDict[str, Adaptor]":
        """Adapted layer name -> its adaptor bank module."""
        out: "OrderedDict[str, Adaptor]" = OrderedDict()
        for name, _, _ in self._layers:
            module = self.model.get_submodule(name)
            out[name] = module.parametrizations.weight[0].adaptor
        return out

    def mixture_parameters(self) -> List[nn.Parameter]:
        return [self.mixture.logits]

    def shared_parameters(self) -> List[nn.Parameter]:
        """Base + adaptor parameters (everything but the mixture logits)."""
        mix = {id(p) for p in self.mixture_parameters()}
        return [p for p in self.parameters() if id(p) not in mix]

    def probs(self) -> Tensor:
        """Eval-mode mixture probabilities (no noise), detached: (C,) or (L, C)."""
        return self.mixture(noise=False).detach()

    def set_oracle(self, cluster: int) -> None:
        """Fix p to exactly one-hot at ``cluster`` and freeze the logits."""
        if isinstance(cluster, bool) or not isinstance(cluster, int) or not 0 <= cluster < self.num_adaptors:
            raise ValueError(f"cluster={cluster!r} is invalid; allowed: int in "
                             f"[0, {self.num_adaptors - 1}]")
        self.mixture.set_oracle(cluster)

    def regularization_loss(self) -> Tensor:
        """``entropy_penalty * H(p)`` (0 when off); add it to the task loss."""
        if self.entropy_penalty == 0:
            return self.mixture.logits.new_zeros(())
        return self.entropy_penalty * self.mixture.entropy()

    @property
    def layer_names(self) -> List[str]:
        return [name for name, _, _ in self._layers]

    # ------------------------------------------------------------------ state dicts
    def _base_items(self) -> List[Tuple[str, Tensor]]:
        # Resolving keys through model.state_dict() walks every module of the parametrized
        # model on each call (~1 ms per message on a small MLP); the owning submodules never
        # change, so resolve them once and read the live tensor (``.to()`` swaps buffers).
        refs = self.__dict__.get("_base_refs")
        if refs is None:
            refs = []
            for k in self._base_keys:
                prefix, _, name = self._key_map[k].rpartition(".")
                refs.append((k, self.model.get_submodule(prefix) if prefix else self.model, name))
            self.__dict__["_base_refs"] = refs
        out = []
        for k, module, name in refs:
            t = module._parameters.get(name)
            out.append((k, module._buffers[name] if t is None else t))
        return out

    def _adaptor_items(self) -> List[Tuple[str, Tensor]]:
        return [(f"adaptor.{name}.{factor}", t)
                for name, adaptor in self.adaptor_modules().items()
                for factor, t in adaptor.state_items()]

    def _shared_targets(self) -> "OrderedDict[str, Tensor]":
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        frozen = self.__dict__.get("_frozen", ())
        for k, t in self._base_items():
            if k not in self._aliases and k not in frozen and not _match(k, self.local_patterns):
                out[f"base.{k}"] = t
        out.update(self._adaptor_items())
        return out

    def _private_targets(self) -> "OrderedDict[str, Tensor]":
        out: "OrderedDict[str, Tensor]" = OrderedDict([("mixture.logits", self.mixture.logits)])
        for k, t in self._base_items():
            if k not in self._aliases and _match(k, self.local_patterns):
                out[f"local.{k}"] = t
        return out

    # ------------------------------------------------------------------ frozen base
    def freeze_base(self, trainable: Union[str, Iterable[str]] = ()) -> "Floral":
        """Freeze the base model (the foundation-model regime): every base parameter whose
        state key matches none of the fnmatch patterns ``trainable`` (e.g. ``"head.*"``) gets
        ``requires_grad=False`` and leaves the shared state, together with the base buffers
        not matched: it is never sent nor loaded, because every party builds it identically (a
        pretrained checkpoint, or the same seeded initialisation). Adaptors, the mixture and
        ``local_patterns`` keys are unaffected. Returns ``self``."""
        patterns = _patterns(trainable, "trainable") or ()
        canonical = [k for k in self._base_keys if k not in self._aliases]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in canonical):
                raise ValueError(
                    f"trainable pattern {pattern!r} matches no base state key; allowed: fnmatch "
                    f"patterns on the wrapped model's state_dict() keys, e.g. "
                    f"{canonical[-1]!r}")
        frozen = {k for k in canonical if not _match(k, patterns) and not _match(k, self.local_patterns)}
        for k, t in self._base_items():
            if k in frozen and isinstance(t, nn.Parameter):
                t.requires_grad_(False)
        self.__dict__["_frozen"] = frozen
        return self

    @property
    def frozen_keys(self) -> List[str]:
        """Base state keys frozen by :meth:`freeze_base` (not in the shared state)."""
        frozen = self.__dict__.get("_frozen", ())
        return [k for k in self._base_keys if k in frozen]

    def shared_state_dict(self) -> "OrderedDict[str, Tensor]":
        """``base.<key>`` (unwrapped model's keys, minus local) then ``adaptor.<layer>.<factor>``.
        Like ``state_dict()``, tensors are detached but share storage (clone before mutating).
        Adaptor tensors have the adaptor index first (``Adaptor.state_items``); for linear
        layers they are views of 2-d parameters and ``adaptor.<layer>.out`` is not contiguous,
        so use ``reshape``, not ``view``."""
        return OrderedDict((k, t.detach()) for k, t in self._shared_targets().items())

    def private_state_dict(self) -> "OrderedDict[str, Tensor]":
        """``mixture.logits`` and ``local.<key>`` for base keys matched by ``local_patterns``."""
        return OrderedDict((k, t.detach()) for k, t in self._private_targets().items())

    @staticmethod
    def _load(targets: Mapping[str, Tensor], sd: Mapping[str, Any], what: str) -> None:
        missing = [k for k in targets if k not in sd]
        extra = [k for k in sd if k not in targets]
        values = {k: torch.as_tensor(v) for k, v in sd.items() if k in targets}
        shaped = [f"{k}: expected {tuple(targets[k].shape)}, got {tuple(values[k].shape)}"
                  for k in values if tuple(values[k].shape) != tuple(targets[k].shape)]
        if missing or extra or shaped:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if extra:
                parts.append(f"unexpected keys {extra}")
            if shaped:
                parts.append("mis-shaped keys [" + "; ".join(shaped) + "]")
            raise ValueError(f"load_{what}_state_dict: " + ", ".join(parts))
        with torch.no_grad():
            for k, t in targets.items():
                t.copy_(values[k])

    def load_shared_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Strict load of the shared state; ValueError names missing/extra/mis-shaped keys."""
        self._load(self._shared_targets(), state_dict, "shared")

    def load_private_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Strict load of the private state; ValueError names missing/extra/mis-shaped keys."""
        self._load(self._private_targets(), state_dict, "private")

    # ------------------------------------------------------------------ merge & report
    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A deep copy of the base architecture with the eval-mode mixture folded in.

        Returns a plain module of the original class (parametrizations and hooks removed, no
        FLoRAL attributes), in eval mode; ``merged(x) == fm.eval()(x)`` up to float rounding.
        """
        fixed = MixtureContext(None, self.mixture(noise=False).detach())
        model = copy.deepcopy(self.model, {id(self._ctx): fixed})
        for name, _, tensors in self._layers:
            module = model.get_submodule(name)
            folded = {t: getattr(module, t).detach().clone() for t in tensors}
            originals = {t: module.parametrizations[t].original for t in tensors}
            # Not parametrize.remove_parametrizations: the deep copy shares the injected
            # "Parametrized<cls>" class with self.model, and removing would delete the class's
            # properties (breaking self). Restore the plain class on the copy instead.
            del module._modules["parametrizations"]
            module.__class__ = type(module).__bases__[0]
            params = OrderedDict()
            for key in self._param_order[name]:
                if key in folded:
                    params[key] = nn.Parameter(folded[key], requires_grad=originals[key].requires_grad)
                else:
                    params[key] = module._parameters[key]
            module._parameters = params
        return model.eval()

    def parameter_report(self) -> ParameterReport:
        adaptors = sum(t.numel() for _, t in self._adaptor_items())
        mixture = self.mixture.logits.numel()
        extra = adaptors + mixture
        base = self._base_numel
        ens = (self.num_adaptors - 1) * base
        shared_bytes = 4 * sum(t.numel() for t in self._shared_targets().values())
        frozen = self.__dict__.get("_frozen", ())
        frozen_numel = sum(t.numel() for k, t in self._base_items()
                           if k in frozen and isinstance(t, nn.Parameter))
        ranks = {name: a.rank for name, a in self.adaptor_modules().items()}
        return ParameterReport(
            base=base, adaptors=adaptors, mixture=mixture,
            overhead_vs_base_pct=100.0 * extra / base if base else math.inf,
            overhead_vs_ensemble_pct=100.0 * extra / ens if ens else math.inf,
            bytes_up=shared_bytes, bytes_down=shared_bytes, num_adaptors=self.num_adaptors,
            frozen=frozen_numel,
            layers=[(name, kind, ranks[name]) for name, kind, _ in self._layers],
            skipped=list(self.skipped))
