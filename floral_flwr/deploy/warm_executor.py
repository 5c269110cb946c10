# size: one fork-server executor with every Flower internal it touches, in one file that is run by path (it cannot import its own package).
"""Warm executor for SuperNodes: a fork-server SuperExec (flower-supernode ``--isolation process``).

Flower 1.41/1.42 runs every message in a fresh ``flwr-clientapp`` process, which imports torch
and the app again (seconds per message on a small CPU; ``deploy/README.md``, "Warm executor").
This keeps Flower's one-process-per-message isolation but makes the process cheap:

``python .../warm_executor.py --runtime-api-address 127.0.0.1:<SuperNode port> --insecure``
imports torch (and the other ``--preload`` modules) **once**, then runs Flower's own SuperExec
loop (``run_superexec``: polls the SuperNode's Runtime API for task tokens) with a
``ForkExecutor``: each ClientApp token is served by ``os.fork()`` of this warm process, and the
child runs Flower's own ClientApp entry (``run_clientapp``) for that token, then exits. Once a
FAB is installed on this node, the parent also imports that FAB's ClientApp module (with
Flower's own loader), so later children start with the app loaded; a message of another FAB
gets a child in which the previous app's modules are dropped first (it imports its own). If
anything of ours fails in a child before Flower's entry runs, the child becomes Flower's own
``flwr-clientapp`` for that token. The same executor serves a SuperLink in ``--isolation
process`` (``--preload`` = ``SERVER_PRELOAD``): the ServerApp of each run is a forked child
running Flower's ``run_serverapp``, so it starts (and sends its first task heartbeat, due within
30 s of the claim) in well under a second even on a loaded machine. Other task types go to
Flower's ``SubprocessExecutor``.

It uses Flower internals (marked INTERNAL below), so the supported flwr versions are pinned
(``flwr_pins.py``) and checked at start with a clear error; the deploy tooling falls back to
Flower's own SuperExec with ``--executor flower``.

This file is run **by path** and imports only the standard library and flwr at module level:
importing the ``floral_flwr`` package here would make the ClientApp use this checkout's code
instead of the code in the FAB that Flower installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: the pin module lies next to this file
    import flwr_pins as pins  # type: ignore[no-redef]

    del sys.path[0]  # this package's directory must not shadow anything (the FAB's code wins)
else:
    from floral_flwr.deploy import flwr_pins as pins

# modules a ClientApp of this project imports; imported once by the warm parent. torch._dynamo is
# what torch.optim pulls in lazily at the first optimizer (seconds of imports otherwise paid by
# every forked child)
DEFAULT_PRELOAD = ("numpy", "torch", "torch.optim", "torch._dynamo", "flwr.clientapp",
                   "flwr.supernode.runtime.run_clientapp")


READY_LINE = "serving task tokens"  # the deploy tooling waits for this line in the log
# what a SuperLink's executor imports once (its children run the ServerApp)
SERVER_PRELOAD = ("numpy", "torch", "torch.optim", "flwr.serverapp", "flwr.superlink.runtime.run_serverapp")


def _log(text: str) -> None:
    print(f"[warm-executor {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------- fork executor


def _installed_app_dir(fab_hash: str) -> Path | None:
    """The directory Flower installed this FAB into (``$FLWR_HOME/apps/<...>.<hash[:8]>``)."""
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION  # INTERNAL layout of FLWR_HOME
    from flwr.supercore.utils import get_flwr_home

    hits = sorted((get_flwr_home() / APP_DIR).glob(f"*.{fab_hash[:FAB_HASH_TRUNCATION]}"))
    hits = [h for h in hits if (h / "pyproject.toml").is_file()]
    return hits[0] if len(hits) == 1 else None


def _modules_under(directory: Path) -> list[str]:
    root = str(directory.resolve()) + os.sep
    out = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and os.path.abspath(f).startswith(root):
            out.append(name)
    return out


def _drop_app(directory: Path) -> None:
    """Forget an app's modules and its sys.path entry (so another FAB's code is imported fresh)."""
    for name in _modules_under(directory):
        sys.modules.pop(name, None)
    while str(directory) in sys.path:
        sys.path.remove(str(directory))
    importlib.invalidate_caches()


class ForkExecutor:
    """Flower's SuperExec ``Executor`` protocol, serving ClientApp tokens by forking this process.

    INTERNAL: the protocol (``get_eligible_capacity``, ``wait_for_capacity``, ``launch``,
    ``reconcile``, ``close``), ``ExecutionSpec`` and ``run_clientapp`` are flwr internals."""

    def __init__(self, warm_app: bool = True) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self._children: dict[int, tuple[int, float]] = {}  # pid -> (task id, launch time)
        self._warm_app = warm_app
        self._app: tuple[str, Path] | None = None  # (fab hash, app dir) imported in this process
        self.launched = 0

    # the protocol ------------------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types: set, *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set, set[str]]:
        return self._fallback.get_eligible_capacity(
            supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type: Any = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type not in (TaskType.CLIENT_APP, TaskType.SERVER_APP):
            return self._fallback.launch(spec)
        stale = self._prepare_app(spec.fab_hash) if spec.task_type == TaskType.CLIENT_APP else None
        t0 = time.monotonic()
        try:
            pid = os.fork()
        except OSError as exc:
            return LaunchResult.failed(f"fork failed: {exc}")
        if pid == 0:
            _serve_token_in_child(spec, stale, t0)  # never returns
        self._children[pid] = (spec.task_id, t0)
        self.launched += 1
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (and log the ones that failed)."""
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self._children.clear()
                return
            if pid == 0:
                return
            task_id, t0 = self._children.pop(pid, (0, time.monotonic()))
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                _log(f"ClientApp child {pid} (task {task_id}) exited with code {code} after "
                     f"{time.monotonic() - t0:.2f} s")

    def close(self) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                self._children.pop(pid, None)
        deadline = time.monotonic() + 5.0
        while self._children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._fallback.close()

    # warm app ----------------------------------------------------------------------------
    def _prepare_app(self, fab_hash: str | None) -> Path | None:
        """Import the FAB's ClientApp here (once it is installed) so children inherit it; returns
        the app dir whose modules a child must drop (an app of another FAB), else None."""
        if not self._warm_app:
            return None
        if not fab_hash:  # cannot tell which app: the child imports its own
            return self._app[1] if self._app else None
        if self._app is not None and self._app[0] == fab_hash:
            return None
        app_dir = _installed_app_dir(fab_hash)
        if app_dir is None:  # first message of this FAB: its child installs it
            return self._app[1] if self._app else None
        if self._app is not None:
            _drop_app(self._app[1])
            self._app = None
        try:
            t0 = time.monotonic()
            _import_client_app(app_dir)
            self._app = (fab_hash, app_dir)
            _log(f"imported the ClientApp of FAB {fab_hash[:8]} from {app_dir} in {time.monotonic() - t0:.2f} s")
        except Exception as exc:  # the child reports the real error through Flower
            _drop_app(app_dir)
            _log(f"could not import the ClientApp of FAB {fab_hash[:8]} in the warm parent ({exc!r}); "
                 f"children import it themselves")
        return None


def _import_client_app(app_dir: Path) -> Any:
    """Flower's own loader (INTERNAL: ``get_project_config``, ``load_app``): what the child
    would do, done once here."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.config import get_project_config
    from flwr.supercore.object_ref import load_app

    ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
    app = load_app(ref, LoadClientAppError, app_dir)
    _run_warm_up(sys.modules.get(ref.partition(":")[0]))
    return app


def _run_warm_up(module: Any) -> None:
    """The app module's optional ``warm_up()`` (this project's: ``client_app.warm_up``), run once
    here so every forked child inherits what it did; an app without one is served as is, and a
    failing one only costs the children the work it would have saved."""
    warm_up = getattr(module, "warm_up", None)
    if not callable(warm_up):
        return
    t0 = time.monotonic()
    try:
        warm_up()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # pylint: disable=broad-except  # SystemExit too: the parent serves on
        _log(f"the app's warm_up() failed ({exc!r}); children do that work themselves")
        return
    _log(f"ran the app's warm_up() in {time.monotonic() - t0:.2f} s")


def _reset_inherited_flwr_state() -> None:
    """A forked child inherits the parent's Flower exit handlers (they close the parent's
    Runtime API client and would terminate the parent's other children) and signal handlers:
    drop them, so the child's ``run_clientapp`` registers only its own. INTERNAL."""
    from flwr.supercore.exit import exit_handler

    exit_handler._lock_handlers = threading.Lock()  # pylint: disable=protected-access
    exit_handler.registered_exit_handlers.clear()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _serve_token_in_child(spec: Any, stale_app: Path | None, t0: float) -> None:
    """The forked child: Flower's own entry for one token (``run_clientapp``, or
    ``run_serverapp`` on a SuperLink), then ``os._exit``. If anything of ours fails before that
    entry runs, the child becomes Flower's own ``flwr-clientapp`` / ``flwr-serverapp`` for the
    token (a cold start, but the task is served)."""
    try:
        _reset_inherited_flwr_state()
        if stale_app is not None:
            _drop_app(stale_app)
        _FORKED.update(task_id=spec.task_id, t0=t0)
        from flwr.supercore.constant import TaskType
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        entry = _client_entry if spec.task_type == TaskType.CLIENT_APP else _server_entry
        certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        _exec_flower_entry(spec)
    code = 1
    try:
        entry(spec, certificates)
        code = 0
    except SystemExit as exc:  # Flower's entries end with flwr_exit -> sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _client_entry(spec: Any, certificates: bytes | None) -> None:
    """What ``flwr-clientapp`` runs (INTERNAL: ``run_clientapp``)."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                  certificates=certificates, parent_pid=spec.parent_pid,
                  runtime_dependency_install=spec.runtime_dependency_install)


def _server_entry(spec: Any, certificates: bytes | None) -> None:
    """What ``flwr-serverapp`` runs: its output mirrored to the run's log (``flwr log``), then
    the ServerApp (INTERNAL: ``run_serverapp``, ``mirror_output_to_queue``)."""
    from queue import Queue

    from flwr.superlink.runtime import run_serverapp
    from flwr.supercore.logger import mirror_output_to_queue, restore_output

    log_queue: Queue = Queue()
    mirror_output_to_queue(log_queue)
    try:
        run_serverapp(runtime_api_address=spec.runtime_api_address, log_queue=log_queue, token=spec.token,
                      insecure=spec.insecure, certificates=certificates, parent_pid=spec.parent_pid,
                      runtime_dependency_install=spec.runtime_dependency_install)
    finally:
        restore_output()


def _exec_flower_entry(spec: Any) -> None:
    """Replace this child by the command Flower's ``SubprocessExecutor`` would have started
    (INTERNAL: ``TASK_TYPE_TO_COMMAND``, ``TASK_TYPE_TO_APPIO_API_ADDRESS_ARG``)."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    cmd = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
           spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        cmd.append("--insecure")
    elif spec.root_certificates_path is not None:
        cmd += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        cmd += ["--parent-pid", str(spec.parent_pid)]
    _log(f"task {spec.task_id}: the warm path failed, running Flower's own {cmd[0]} for it")
    sys.stdout.flush()
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(1)  # execvp failed


_FORKED: dict[str, Any] = {}  # in a child: its task id and launch time


def _log_client_app_start() -> None:
    """Make each child log how long after the fork its ClientApp handler started and how long
    it ran (the per-message start-up the benchmark reports)."""
    from flwr.clientapp.client_app import ClientApp

    call = ClientApp.__call__

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return call(self, *args, **kwargs)
        finally:
            if _FORKED:
                _log(f"task {_FORKED['task_id']}: ClientApp started {started - _FORKED['t0']:.3f} s after "
                     f"the fork, handler ran {time.monotonic() - started:.3f} s")

    ClientApp.__call__ = timed  # type: ignore[method-assign]


def _skip_reinstalling_fabs() -> None:
    """``run_clientapp`` extracts and re-verifies the whole FAB on every message before
    ``validate_and_install`` notices that this FAB (by its SHA-256) is installed already and
    returns that directory without looking at it. Return the installed directory directly when
    it exists (same result, without the extraction). INTERNAL: ``run_clientapp.install_from_fab``."""
    import flwr.supernode.runtime.run_clientapp as rc

    original = rc.install_from_fab

    def install_once(fab_file: Any, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        if isinstance(fab_file, bytes) and install_dir is None:
            found = _installed_app_dir(hashlib.sha256(fab_file).hexdigest())
            if found is not None:
                return found
        return original(fab_file, install_dir, skip_prompt)

    rc.install_from_fab = install_once


def _poll_message_objects_sooner(initial: float = 0.02, cap: float = 0.25) -> None:
    """A child starts within milliseconds of its task, often before the SuperNode has finished
    pulling the message's arrays from the SuperLink; Flower then retries after 1, 2, 4, ... s
    (a cold ``flwr-clientapp`` never noticed: its start-up took longer). Retry the *local* pull
    from the SuperNode after ``initial`` s, doubling up to ``cap``, bounded by Flower's own
    ``max_time`` instead of a number of tries. INTERNAL: ``pull_and_inflate_object_from_tree``
    as named in ``run_clientapp``."""
    import functools

    import flwr.supernode.runtime.run_clientapp as rc

    rc.pull_and_inflate_object_from_tree = functools.partial(
        rc.pull_and_inflate_object_from_tree, initial_backoff=initial, backoff_cap=cap, max_tries_per_object=None)


def _preload(modules: list[str]) -> float:
    t0 = time.monotonic()
    for name in modules:
        importlib.import_module(name)
    return time.monotonic() - t0


def run_executor(runtime_api_address: str, insecure: bool, root_certificates: str | None,
                 parent_pid: int | None, preload: list[str], warm_app: bool = True) -> None:
    """Flower's SuperExec loop (INTERNAL: ``run_superexec``, its module-level ``get_executor``)
    with the ``ForkExecutor``."""
    from flwr.supercore.superexec import run_superexec as loop

    took = _preload(preload)
    _log_client_app_start()
    _skip_reinstalling_fabs()
    _poll_message_objects_sooner()
    executor = ForkExecutor(warm_app=warm_app)
    _log(f"pid {os.getpid()}: imported {', '.join(preload) or 'nothing'} in {took:.2f} s; {READY_LINE} "
         f"(ClientApp, ServerApp) of {runtime_api_address} by fork (task poll {os.environ.get(pins.TASK_POLL_ENV, '1.0')} s)")
    loop.get_executor = lambda *a, **k: executor  # type: ignore[assignment]
    loop.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                       root_certificates_path=root_certificates, parent_pid=parent_pid)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="warm_executor.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates", default=None)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    p.add_argument("--preload", default=",".join(DEFAULT_PRELOAD), help="modules imported once, comma-separated")
    p.add_argument("--no-warm-app", action="store_true", help="do not import the FAB's ClientApp in the parent")
    a = p.parse_args(argv)
    pins.exit_if_unsupported()
    mods = [m for m in a.preload.split(",") if m.strip()]
    run_executor(a.runtime_api_address, a.insecure, a.root_certificates, a.parent_pid, mods,
                 warm_app=not a.no_warm_app)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
