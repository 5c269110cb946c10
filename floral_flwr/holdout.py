"""Clients that never train (``holdout-clients``): which ones, decided identically everywhere.

The set is a seeded function of (number of clients, fraction, seed), so each client knows whether
it is held out (it tells the server in its discovery reply) and the server never samples it for
training. At evaluation a held-out client reports the zero-shot metric (its personal part at its
initial value: uniform mixture / the global model) and the metric after fitting only what is
personal on its train split for ``adapt-steps`` steps (``ModelHandle.adapt``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def holdout_count(num_clients: int, fraction: float) -> int:
    if fraction <= 0 or num_clients < 2:
        return 0
    return int(min(num_clients - 1, max(1, round(fraction * num_clients))))


def holdout_clients(num_clients: int, fraction: float, seed: int,
                    clusters: Sequence[int | None] | None = None) -> frozenset[int]:
    """Client ids held out of training (at least one client always trains).

    With the task's ground-truth ``clusters`` (one entry per client), the choice is stratified:
    clusters take turns (in a seeded order), each giving a seeded random member, so the held-out
    clients spread over the clusters instead of possibly emptying one of them of trained clients
    (a cluster with no trained client has no adaptor to find). Without clusters: seeded uniform.
    """
    k = holdout_count(num_clients, fraction)
    if k == 0:
        return frozenset()
    rng = np.random.default_rng([int(seed), 4242, int(num_clients)])
    if clusters is None or len(clusters) != num_clients or any(c is None for c in clusters):
        return frozenset(int(i) for i in rng.choice(num_clients, size=k, replace=False))
    groups: dict[int, list[int]] = {}
    for cid, c in enumerate(clusters):
        groups.setdefault(int(c), []).append(cid)
    queues = [list(rng.permutation(groups[c])) for c in sorted(groups)]
    order = list(rng.permutation(len(queues)))
    chosen: list[int] = []
    while len(chosen) < k:
        for q in order:
            if queues[q] and len(chosen) < k:
                chosen.append(int(queues[q].pop(0)))
    return frozenset(chosen)
