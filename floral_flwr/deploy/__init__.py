"""Real deployment: a SuperLink, N SuperNodes, ``flwr run``, run status, and a clean stop.

``python -m floral_flwr.deploy <command>`` (commands and security notes: ``cli.py``; walkthrough
in ``deploy/README.md``). The package, by responsibility:

- ``settings``      ``DeployError``, addresses, the loopback-only rule for insecure mode, the node
                    config (checked and formatted), the environment Flower processes get
- ``certificates``  ``Certs``, throw-away ``make_certs``, the TLS context for health checks
- ``processes``     start SuperLink/SuperNodes in their own process groups with PID files, wait
                    until healthy, stop/kill exactly those processes and their descendants
- ``connection``    the ``flwr`` CLI connection file and calls: register, submit, status, log, stop
- ``deployment``    ``Deployment``: a throw-away loopback deployment for tests and benchmarks
- ``proxy``         ``ByteCountingProxy``: counts the bytes between SuperNodes and the SuperLink,
                    and can shape that link (delay, bandwidth)
- ``gateway``       ``FleetGateway``: the only part of a SuperLink facing the network (Fleet API
                    calls only; the Control API stays on 127.0.0.1)
- ``warm_executor`` the fork-server executor (torch and the app imported once, one forked child
                    per message) for SuperNodes and the SuperLink in ``--isolation process``
- ``node_waits``    ``flower-supernode`` with its fixed 3 s / 0.5 s waits shortened while a round is on
- ``flwr_pins``     the flwr versions whose internals those two use, and the check at start
- ``labnet``        SuperNodes in their own network namespaces over veth pairs, ``tc`` shaping
- ``cli``           the command line (``main``); ``__main__`` runs it

The names below are re-exported so ``from floral_flwr.deploy import X`` keeps working; the
submodules import each other, never this package (no import cycle).
"""

from floral_flwr.deploy.certificates import Certs, make_certs
from floral_flwr.deploy.cli import main
from floral_flwr.deploy.connection import (CONNECTION, fetch_log, register_supernode, run_status, stop_run, submit,
                                           wait_run, write_connection)
from floral_flwr.deploy.deployment import Deployment
from floral_flwr.deploy.processes import (Proc, descendants, kill_proc, load_procs, start_superlink, start_supernode,
                                          stop_all, stop_proc, wait_healthy)
from floral_flwr.deploy.proxy import ByteCountingProxy
from floral_flwr.deploy.settings import (DeployError, check_insecure, check_node_config, format_node_config,
                                         is_loopback, split_address)

__all__ = [
    "CONNECTION", "ByteCountingProxy", "Certs", "DeployError", "Deployment", "Proc", "check_insecure",
    "check_node_config", "descendants", "fetch_log", "format_node_config", "is_loopback", "kill_proc",
    "load_procs", "main", "make_certs", "register_supernode", "run_status", "split_address", "start_superlink",
    "start_supernode", "stop_all", "stop_proc", "stop_run", "submit", "wait_healthy", "wait_run",
    "write_connection",
]
