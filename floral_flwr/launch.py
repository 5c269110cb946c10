# size: the launch sequence reads top to bottom: validate, start, stream, decide, stop everything it started.
"""Run the app with ``flwr run`` on a private, throw-away simulation SuperLink.

``python -m floral_flwr.launch [--num-supernodes 20] [--run-config "k=v ..."]`` does what a
careful user does by hand, and nothing more:

1. validates the run config here, before anything starts: a misspelled key, task, method or
   value stops in well under a second with one line naming it and its nearest valid spelling;
   then the task's presets and the federation size are checked (a task with C clusters needs
   at least C SuperNodes);
2. sets the offline-safe environment (no telemetry, no update check, no per-run ``uv sync``);
3. starts ``flower-superlink --simulation`` on free loopback ports, in its own process group,
   with a private ``FLWR_HOME`` in a temporary folder (never touches ``~/.flwr`` or a SuperLink
   someone else runs; the folder is removed at the end);
4. ``flwr run <app> <connection> --stream`` with the given run config and federation config,
   passing the app's git revision (computed here, before Flower builds the FAB) to the run;
5. decides success from the run **status** (``flwr list --format json``), because
   ``flwr run --stream`` exits 0 even when the run failed;
6. stops exactly the processes it started: every process that inherited this launch's marker
   variable (SuperLink, ``flower-superexec``, the simulation, Ray's daemons and workers), also
   on Ctrl-C or SIGTERM: it stops the run, prints what it did and exits 130 (143 on SIGTERM).

Exit code 0 only when the run status is ``finished:completed``; 2 when the configuration is
invalid (nothing was started) or the ServerApp stopped before round 1.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from floral_flwr.config import ConfigError, precheck_run_config
from floral_flwr.preflight import check_run_config, parse_cli_run_config

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
# every process launch starts inherits this variable (with a fresh id per launch): the stop
# finds them all through /proc, even those Ray re-parents or puts in other process groups
MARK_ENV = "FLORAL_LAUNCH_ID"
# lines Flower prints about sizing the default federation: launch sizes it with --num-supernodes
_FLOWER_SIZE_HINTS = ("default simulated SuperNodes changed", "To change federation size",
                      "flwr federation simulation-config",
                      # Ray's actors saying goodbye after the run's summary
                      "Manually terminating ClientAppActor")
_STOPPED = re.compile(r"^\[[^\]\s]+\] stopped before round 1: ")
_RUN_DIR = re.compile(r"run directory: (\S.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A console script next to this interpreter (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found: install the app with `pip install -e .` first")
    return found


def wait_healthy(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"SuperLink on 127.0.0.1:{port} not healthy after {timeout:g} s")


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we created, then SIGKILL what is left after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def _has_proc() -> bool:
    """Whether /proc can tell processes' environments (Linux)."""
    return Path("/proc/self/environ").exists()


def marked_pids(mark: str) -> list[int] | None:
    """PIDs of this user's processes whose environment holds ``MARK_ENV=mark``; None where
    /proc cannot tell (not Linux)."""
    proc = Path("/proc")
    if not _has_proc():
        return None
    needle = f"{MARK_ENV}={mark}".encode()
    me = os.getpid()
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle in env.split(b"\0"):
            found.append(int(d.name))
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process /proc shows."""
    table: dict[int, tuple[int, str, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        table[int(d.name)] = (int(fields[1]), fields[19], fields[0])
    return table


def _stop_targets(mark: str, known: dict[int, str]) -> dict[int, str]:
    """Marked processes and every descendant of them or of ``known`` still alive, as
    pid -> start time. Descendants count because a process can lose the mark: Ray's agents
    rename themselves (setproctitle), which overwrites the environment /proc shows."""
    table = _process_table()
    me = os.getpid()
    roots = set(marked_pids(mark) or [])
    # a known pid counts only while it is the same process (same start time) and not a zombie
    roots |= {p for p, t in known.items() if p in table and table[p][1] == t}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p in found or p == me or p not in table:
            continue
        found.add(p)
        todo += children.get(p, [])
    return {p: table[p][1] for p in found if table[p][2] != "Z"}


def stop_marked(mark: str, fallback: list[subprocess.Popen], term_grace: float = 4.0,
                kill_grace: float = 10.0) -> int:
    """Stop every process carrying ``mark`` and all their descendants: SIGTERM, then SIGKILL
    what is left after ``term_grace`` seconds (Ray's agents ignore SIGTERM for a while).
    Returns how many there were. Without /proc: the process groups of ``fallback``."""
    if not _has_proc():  # no /proc: the process groups we created, and our direct children
        for p in fallback:
            try:
                leader = os.getpgid(p.pid) == p.pid
            except ProcessLookupError:
                continue
            if leader:
                stop_group(p, grace=term_grace)
            elif p.poll() is None:
                p.kill()
        return len(fallback)
    targets = _stop_targets(mark, {})
    n = len(targets)
    _signal_all(sorted(targets), signal.SIGTERM)
    deadline = time.monotonic() + term_grace
    while targets and time.monotonic() < deadline:
        time.sleep(0.2)
        targets = _stop_targets(mark, targets)
    # SIGKILL every pass, not once: a dying parent can still fork a child after the first
    # SIGKILL went out, and that child is a descendant (or carries the mark) too.
    deadline = time.monotonic() + kill_grace
    while targets and time.monotonic() < deadline:
        _signal_all(sorted(targets), signal.SIGKILL)
        time.sleep(0.2)
        targets = _stop_targets(mark, targets)
    for p in fallback:  # reap our direct children
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    return n


def run_status(flwr: str, conn: str, run_id: str, env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(
        [flwr, "list", conn, "--run-id", run_id, "--format", "json"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    try:
        run = json.loads(out.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr).strip()[-500:]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{seconds:.1f} s"


def _say(text: str) -> None:
    print(f"[launch] {text}", flush=True)


def _pump(stream, lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def launch(
    app_dir: str,
    run_config: str = "",
    num_supernodes: int = 20,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    timeout: float = 3600.0,
    work_dir: str | None = None,
) -> int:
    """Run the app once on a private simulation SuperLink; returns the process exit code.
    The run config is assumed valid (``main`` checks it first)."""
    from floral_flwr.provenance import SOURCE_REVISION_ENV, git_revision

    t0 = time.monotonic()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    mark = uuid.uuid4().hex
    env = {**os.environ, **OFFLINE_ENV, MARK_ENV: mark}
    revision = git_revision(app_dir)
    if revision:
        env[SOURCE_REVISION_ENV] = revision
    # the SuperLink starts `flower-superexec` (and Ray its workers) through PATH: make sure this
    # interpreter's environment comes first even when it is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    own_work = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="floral-launch-"))
    (work / "cli").mkdir(parents=True, exist_ok=True)
    port, control = free_port(), free_port()
    link_log = open(work / "superlink.log", "w")
    children: list[subprocess.Popen] = []
    run_id: str | None = None
    run_dir: str | None = None
    code = 1
    try:
        link = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--control-api-address", f"127.0.0.1:{control}"],
            env={**env, "FLWR_HOME": str(work / "superlink")},
            stdout=link_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        children.append(link)
        wait_healthy(port, 90, link)
        _say(f"SuperLink (pid {link.pid}) ready on 127.0.0.1:{port} after {_fmt(time.monotonic() - t0)}; "
             f"source {revision[:12] + ('-dirty' if revision.endswith('-dirty') else '') if revision else 'not a git checkout'}")
        (work / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        cli_env = {**env, "FLWR_HOME": str(work / "cli")}
        flwr = _bin("flwr")
        fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus} client-resources-num-gpus={num_gpus}"
        cmd = [flwr, "run", app_dir, "sim", "--stream", "--federation-config", fed]
        if run_config:
            cmd += ["--run-config", run_config]
        _say(" ".join(cmd))
        proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children.append(proc)
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        stopped_early = timed_out = False
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                continue
            if line is None:
                break
            if any(h in line for h in _FLOWER_SIZE_HINTS):
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
            m = re.search(r"started run (\d+)", line)
            if m:
                run_id = m.group(1)
            m = _RUN_DIR.search(line)
            if m:
                run_dir = m.group(1).strip()
            if _STOPPED.search(line):
                stopped_early = True
        if timed_out:
            _say(f"timed out after {timeout:g} s: stopping run {run_id or '(not submitted yet)'} and everything launch started")
            code = 1
        elif run_id is None:
            proc.wait(timeout=30)
            _say("the run was not submitted (see the output above)")
            code = 2
        else:
            status, details = "unknown", ""
            for _ in range(60):  # the status can trail the end of the log stream briefly
                status, details = run_status(flwr, "sim", run_id, cli_env)
                if status.startswith("finished"):
                    break
                time.sleep(1)
            wall = _fmt(time.monotonic() - t0)
            if stopped_early:
                _say(f"run {run_id} stopped before round 1 (the line above says why); nothing was trained")
                code = 2
            elif status == "finished:completed":
                _say(f"run {run_id}: {status} in {wall}" + (f"; results in {run_dir}" if run_dir else ""))
                code = 0
            else:
                _say(f"run {run_id}: {status} {details}".rstrip() + f" after {wall}; SuperLink log: see below")
                _tail(work / "superlink.log")
                code = 1
    except Interrupted as exc:
        _ignore_signals()  # a second Ctrl-C must not cut the clean-up short
        code = 128 + exc.signum
        what = "Ctrl-C" if exc.signum == signal.SIGINT else exc.args[0]
        _say(f"{what}: stopping run {run_id or '(not submitted yet)'} and everything launch started ...")
        t_stop = time.monotonic()
        n = stop_marked(mark, children)
        hint = ""
        if run_dir:
            hint = (f"; partial results and the last checkpoint are in {run_dir} (to continue, add "
                    f"run-name='{Path(run_dir).name}' resume=true to --run-config)")
        _say(f"stopped {n} process(es) in {time.monotonic() - t_stop:.1f} s{hint}")
    finally:
        _ignore_signals()
        stop_marked(mark, children)
        link_log.close()
        if run_dir and Path(run_dir).is_dir():
            try:
                shutil.copyfile(work / "superlink.log", Path(run_dir) / "superlink.log")
            except OSError:
                pass
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _tail(path: Path, n: int = 15) -> None:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return
    for line in lines:
        print(f"  | {line}", flush=True)


def _on_signal(signum: int, _frame: object) -> None:
    # an exception in the main thread, so that launch() stops the run and cleans up
    raise Interrupted(signum)


def validate(run_config: str, num_supernodes: int) -> str | None:
    """The run config checked here, before anything starts; the error line or None.

    The fast check (keys, names, explicit values) runs in this process; the full one (the
    task's presets, the task against the number of SuperNodes) imports torch, so it runs in a
    short-lived child: this process then stays small for the whole run and exits at once."""
    try:
        given = parse_cli_run_config(run_config)
        precheck_run_config(given)  # no torch, well under a second
    except ConfigError as exc:
        return str(exc)
    code = "import sys; from floral_flwr.launch import full_check; sys.exit(full_check(sys.argv[1], int(sys.argv[2])))"
    res = subprocess.run([sys.executable, "-c", code, run_config, str(num_supernodes)],
                         capture_output=True, text=True)
    if res.returncode == 0:
        return None
    lines = res.stdout.strip().splitlines() or res.stderr.strip().splitlines() or ["the full check failed"]
    return lines[-1]


def full_check(run_config: str, num_supernodes: int) -> int:
    """The checks that need the task (run by :func:`validate` in a child process): prints the
    error line and returns 2, or returns 0."""
    try:
        cfg = check_run_config(parse_cli_run_config(run_config), num_supernodes,
                               fix="give --num-supernodes at least that many (20 is the default)")
    except ConfigError as exc:
        print(exc)
        return 2
    if cfg.min_available_nodes > num_supernodes:
        print(f"run config 'min-available-nodes' = {cfg.min_available_nodes} is more than "
              f"--num-supernodes {num_supernodes}: the run would wait for nodes that never come")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m floral_flwr.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Tasks, methods and keys: python -m floral_flwr list tasks|methods|keys")
    p.add_argument("--app", default=".", help="app directory (with pyproject.toml); default: .")
    p.add_argument("--run-config", default="", help='run-config overrides, e.g. "method=\'fedavg\' seed=1"')
    p.add_argument("--num-supernodes", type=int, default=20, help="simulated clients (default 20)")
    p.add_argument("--num-cpus", type=int, default=1, help="CPUs per ClientApp (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPU fraction per ClientApp (e.g. 0.25)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    p.add_argument("--work-dir", default=None,
                   help="where SuperLink state and logs go (default: a temporary folder, removed at the end)")
    a = p.parse_args(argv)
    if a.num_supernodes < 1 or a.num_cpus < 1 or a.num_gpus < 0 or a.timeout <= 0:
        p.error("--num-supernodes and --num-cpus must be >= 1, --num-gpus >= 0, --timeout > 0")
    error = validate(a.run_config, a.num_supernodes)
    if error is not None:
        print(f"[launch] error: {error}", file=sys.stderr, flush=True)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):  # a background job may inherit SIGINT ignored
        signal.signal(sig, _on_signal)
    try:
        return launch(a.app, a.run_config, a.num_supernodes, a.num_cpus, a.num_gpus, a.timeout, a.work_dir)
    except Interrupted as exc:  # before anything was started
        _say(f"{exc.args[0]}: nothing was started")
        return 128 + exc.signum


if __name__ == "__main__":
    raise SystemExit(main())
