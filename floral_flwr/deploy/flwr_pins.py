"""The flwr versions whose internals the warm runtime (``warm_executor.py``, ``node_waits.py``)
was read against and tested with, and the check both run at start.

Standard library only: both scripts are run by path and import this file next to them (see
``warm_executor.py``); the deploy tooling imports it as ``floral_flwr.deploy.flwr_pins``.
"""

from __future__ import annotations

import importlib.metadata
import sys

# every flwr module both scripts import is byte-identical in flwr 1.41.0 and 1.42.0 except
# supercore/superexec/run_superexec.py, whose 1.41.0 copy also hands a trace carrier to the
# task-dispatch span (tracing only; the loop and the Executor protocol are the same); both
# versions pass the tests in scripts/test_flwr_versions.sh. pyproject's flwr range matches.
SUPPORTED_FLWR = ("1.41", "1.42")
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # documented SuperExec knob (0.01-60 s)
EXIT_BAD_VERSION = 2


def installed_flwr_version() -> str:
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def flwr_version_problem(version: str | None = None) -> str | None:
    """None when ``version`` (default: the installed flwr) is supported, else the message."""
    version = installed_flwr_version() if version is None else version
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in SUPPORTED_FLWR:
        return None
    return (f"the warm executor / short SuperNode waits support flwr {', '.join(v + '.x' for v in SUPPORTED_FLWR)} "
            f"(they use Flower internals), but flwr {version} is installed: use Flower's own "
            f"processes with `--executor flower --node-poll 0`, or install a supported flwr")


def exit_if_unsupported() -> None:
    problem = flwr_version_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_VERSION)
