"""Server-side bounds on the weight of a reply: from what the server knows, never from what a
client declares.

A train reply's ``num-examples`` n_k is its weight in the base average and bounds its adaptor
weights (w_k(c) = n_k p_k(c) <= n_k). A client that could choose n_k could make the global
model its own arrays. So each client id gets a cap, fixed the first time the server hears of
it, and a reply above its cap is refused:

1. the partition size, when the server can compute the partition itself (simulation with an
   embedded task: ``task_sizes(num_partitions)`` returns every client's train size);
2. otherwise the train size the client declared the *first* time its id was seen (a restarted
   or impersonating node cannot raise it later);
3. in both cases at most the run config's ``max-examples`` (when > 0), the operator's bound for
   deployments where nodes bring their own data, and at most
   :data:`~floral_flwr.strategy.validation.MAX_NUM_EXAMPLES`.

The number of partitions is pinned once: the value most nodes of the first discovery report; a
node reporting another one, or a client id outside it, is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from floral_flwr.strategy.validation import MAX_NUM_EXAMPLES, InvalidReply

logger = logging.getLogger("floral_flwr")


class ExampleCaps:
    """Per-client caps on ``num-examples``.

    Parameters
    ----------
    max_examples : float
        The run config's ``max-examples``; 0 means no operator bound.
    task_sizes : callable, optional
        ``num_partitions -> list of train sizes`` (or None when the server cannot know them).
    """

    def __init__(self, max_examples: float = 0.0,
                 task_sizes: Callable[[int], Sequence[int] | None] | None = None) -> None:
        self.max_examples = float(max_examples) if max_examples and max_examples > 0 else None
        self._task_sizes = task_sizes
        self.num_partitions: int | None = None
        self.sizes: list[int] | None = None  # the server's own partition sizes, when known
        self.first_seen: dict[int, float] = {}  # client id -> first declared train size
        self._warned: set[int] = set()

    def admit_partitions(self, num_partitions: int) -> None:
        """Pin the number of partitions (the majority of the first discovery, see
        :class:`~floral_flwr.strategy.nodes.ClientDirectory`); a different later value is refused."""
        self._pin_partitions(num_partitions)

    def _pin_partitions(self, num_partitions: int) -> None:
        if self.num_partitions is None:
            self.num_partitions = int(num_partitions)
            sizes = self._task_sizes(self.num_partitions) if self._task_sizes is not None else None
            self.sizes = [int(v) for v in sizes] if sizes is not None else None
        elif int(num_partitions) != self.num_partitions:
            raise InvalidReply(
                f"reports num-partitions = {num_partitions}, but the federation has "
                f"{self.num_partitions} partitions")

    def admit(self, client_id: int, declared: float, num_partitions: int | None = None) -> float:
        """Record a discovery reply (already type-checked); returns the client's cap.

        Raises :class:`InvalidReply` when the reply contradicts what the server knows."""
        if num_partitions is not None:
            self._pin_partitions(num_partitions)
        if self.num_partitions is not None and not 0 <= client_id < self.num_partitions:
            raise InvalidReply(f"client-id {client_id} is outside [0, {self.num_partitions})")
        if self.sizes is None:
            self.first_seen.setdefault(client_id, float(declared))
        cap = self.cap(client_id)
        if declared > cap and client_id not in self._warned:
            self._warned.add(client_id)
            logger.warning("client %d declares %g train examples, above the server's bound %g: "
                           "its replies may carry at most %g", client_id, declared, cap, cap)
        return cap

    def cap(self, client_id: int | None) -> float:
        """The largest ``num-examples`` a reply of ``client_id`` may carry."""
        limit = MAX_NUM_EXAMPLES if self.max_examples is None else min(self.max_examples, MAX_NUM_EXAMPLES)
        if client_id is None:
            return limit
        if self.sizes is not None:
            if not 0 <= client_id < len(self.sizes):
                return 0.0  # not a partition of this federation: no reply is accepted
            return min(float(self.sizes[client_id]), limit)
        return min(self.first_seen.get(client_id, limit), limit)
