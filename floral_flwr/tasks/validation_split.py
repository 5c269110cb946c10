"""A validation split carved from a client's *train* data (run-config ``validation-fraction``).

Hyper-parameters chosen on the test split overfit it; chosen on a validation split that is never
trained on, they do not (``python -m floral_flwr.compare --tune``). With ``validation-fraction``
f > 0 every client keeps a seeded ``round(f * n)`` of its train rows aside (at least one on each
side), trains on the rest and is evaluated on the held-out rows in place of its test split, so a
tuning run never reads test data. The split depends on the run seed and the client id only, so
every method sees the same validation rows for a given seed.
"""

from __future__ import annotations

import torch

from floral_flwr.tasks.base import ClientData


def validation_size(n: int, fraction: float) -> int:
    """Rows held out of ``n``: ``round(fraction * n)``, at least 1 and at most ``n - 1``."""
    if fraction <= 0:
        return 0
    if n < 2:
        raise ValueError(f"validation-fraction = {fraction}: a client with {n} train example(s) "
                         "cannot give a validation split (needs at least 2); use validation-fraction = 0")
    return min(max(int(round(fraction * n)), 1), n - 1)


def _generator(seed: int, cid: int) -> torch.Generator:
    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(cid)) * 2_654_435_761 + 97) % (1 << 63))


def validation_split(data: ClientData, fraction: float, seed: int, cid: int) -> ClientData:
    """``data`` with its train split cut in two: train = the kept rows (original order), test =
    the held-out validation rows. ``fraction`` = 0 returns ``data`` itself."""
    n = data.num_train
    k = validation_size(n, fraction)
    if k == 0:
        return data
    perm = torch.randperm(n, generator=_generator(seed, cid))
    held = perm[:k].sort().values
    kept = perm[k:].sort().values
    return ClientData(data.train_x[kept], data.train_y[kept], data.train_x[held], data.train_y[held])
