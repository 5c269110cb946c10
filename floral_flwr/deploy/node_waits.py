"""``flower-supernode`` with its fixed waits shortened while a round is on.

``python .../node_waits.py --node-poll 0.2 -- <flower-supernode arguments>`` runs Flower's own
SuperNode in this process, with two changes to its main loop (flwr 1.41/1.42,
``supernode/start_client_internal.py``; INTERNAL, pinned in ``flwr_pins.py``):

- the 3 s idle wait between pulls becomes ``--node-poll`` while the node handled a message in
  the last ``--hot-window`` seconds (a round is on: the next message is due soon), and Flower's
  3 s otherwise (an idle fleet costs the SuperLink what it costs with stock Flower); the 0.5 s
  poll for the ClientApp's reply becomes ``--node-poll`` / 4 (a local lookup);
- the object-pull backoff (1, 2, 4 ... s when a message's arrays are not on the SuperLink yet)
  starts at ``--node-poll`` / 4 and is capped at 1 s.

Cost and risk (``deploy/README.md``): a busy node pulls ``1 / node-poll`` times a second
instead of every 3 s, i.e. that many more requests per node on the SuperLink's Fleet API for
``hot-window`` seconds after each message; it relies on Flower internals (version-pinned).
Run by path and imports only the standard library and flwr (no torch in the SuperNode).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):  # run by path: the pin module lies next to this file
    import flwr_pins as pins  # type: ignore[no-redef]

    del sys.path[0]  # this package's directory must not shadow anything
else:
    from floral_flwr.deploy import flwr_pins as pins

FLOWER_IDLE_WAIT_S = 3.0  # flower-supernode's hard-coded wait when no message is waiting
FLOWER_REPLY_POLL_S = 0.5  # flower-supernode's hard-coded poll for the ClientApp's reply


class AdaptiveWaits:
    """Stands in for the ``time`` module inside flower-supernode's main loop (INTERNAL:
    ``flwr.supernode.start_client_internal.time``): its fixed 3 s idle wait becomes ``poll``
    while the node handled a message within the last ``hot_window`` seconds (a round is on, the
    next message is due soon), Flower's 3 s otherwise (an idle fleet costs the SuperLink what it
    costs with stock Flower); its 0.5 s reply poll becomes ``poll / 4`` (a local lookup)."""

    def __init__(self, poll: float, hot_window: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.poll, self.hot_window = poll, hot_window
        self._clock, self._sleep = clock, sleep
        self.last_busy = -float("inf")

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_REPLY_POLL_S:  # waiting for a reply: a message is being handled
            self.last_busy = self._clock()
            self._sleep(max(0.01, self.poll / 4))
        elif seconds == FLOWER_IDLE_WAIT_S and self._clock() - self.last_busy < self.hot_window:
            self._sleep(self.poll)
        else:
            self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:  # time.time(), time.monotonic(), ... unchanged
        return getattr(time, name)


def run_supernode(argv: list[str], poll: float, hot_window: float) -> None:
    """``flower-supernode <argv>`` in this process, with ``AdaptiveWaits`` in its main loop.

    The ServerApp pushes a message first and its arrays right after; a node that pulls the
    message in between (likely once it pulls every ``poll`` s) found them missing and waited
    1, 2, 4 ... s (Flower's object-pull backoff); it now retries after ``poll`` / 4 s, doubling
    up to 1 s, bounded by Flower's ``max_time`` (INTERNAL: ``start_client_internal.pull_objects``)."""
    from flwr.supernode import start_client_internal as node_loop
    from flwr.supernode.cli import flower_supernode

    node_loop.time = AdaptiveWaits(poll, hot_window)  # type: ignore[assignment]
    node_loop.pull_objects = functools.partial(  # type: ignore[assignment]
        node_loop.pull_objects, initial_backoff=max(0.01, poll / 4), backoff_cap=1.0, max_tries_per_object=None)
    sys.argv = ["flower-supernode", *argv]  # flwr reads its own arguments (and argv[0])
    flower_supernode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="node_waits.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node-poll", type=float, required=True, help="idle wait while a round is on (s)")
    p.add_argument("--hot-window", type=float, default=60.0, help="seconds after a message that count as busy")
    p.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    a = p.parse_args(argv)
    pins.exit_if_unsupported()
    if not 0.01 <= a.node_poll <= FLOWER_IDLE_WAIT_S:
        p.error(f"--node-poll {a.node_poll} is not in [0.01, {FLOWER_IDLE_WAIT_S}]")
    args = a.supernode_args[1:] if a.supernode_args[:1] == ["--"] else a.supernode_args
    run_supernode(args, a.node_poll, a.hot_window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
