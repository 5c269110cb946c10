"""Connection files and ``flwr`` CLI calls: a private FLWR_HOME with one connection to the
SuperLink (``write_connection``), then ``flwr supernode register``, ``flwr run`` (``submit``),
``flwr list`` (``run_status``, ``wait_run``), ``flwr log`` (``fetch_log``, and ``follow_run``:
the run's output live, line by line), and ``flwr stop``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from floral_flwr.deploy.settings import DeployError, _env
from floral_flwr.launch import _bin

CONNECTION = "deploy"


def write_connection(work: str | Path, superlink: str, ca: Path | None = None, name: str = CONNECTION) -> Path:
    """A private FLWR_HOME for the ``flwr`` CLI with one connection to ``superlink``."""
    home = Path(work) / "cli"
    home.mkdir(parents=True, exist_ok=True)
    body = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{superlink}"\n'
    body += f"root-certificates = {json.dumps(str(Path(ca).resolve()))}\n" if ca else "insecure = true\n"
    (home / "config.toml").write_text(body)
    return home


def _flwr(args: list[str], cli_home: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_bin("flwr"), *args], capture_output=True, text=True,
                              env=_env(cli_home), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g} s "
                          f"(is the SuperLink reachable and the certificate right?)") from exc


def register_supernode(cli_home: Path, public_key: Path, conn: str = CONNECTION, timeout: float = 60) -> str:
    """``flwr supernode register`` (SuperNode authentication); returns the CLI output."""
    p = _flwr(["supernode", "register", str(public_key), conn], cli_home, timeout)
    if p.returncode != 0:
        raise DeployError(f"registering '{public_key}' failed: {(p.stdout + p.stderr).strip()[-600:]}")
    return p.stdout.strip()


def run_status(cli_home: Path, run_id: str, conn: str = CONNECTION, timeout: float = 30) -> tuple[str, str]:
    p = _flwr(["list", conn, "--run-id", str(run_id), "--format", "json"], cli_home, timeout)
    try:
        run = json.loads(p.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError):
        return "unknown", (p.stdout + p.stderr).strip()[-500:]


def submit(app_dir: str | Path, cli_home: Path, run_config: str = "", conn: str = CONNECTION,
           timeout: float = 180) -> str:
    """``flwr run <app> <conn>`` (no streaming); returns the run id."""
    args = ["run", str(app_dir), conn, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    p = _flwr(args, cli_home, timeout)
    out = p.stdout + p.stderr
    m = re.search(r'"run-id":\s*"?(\d+)', out) or re.search(r"started run (\d+)", out)
    if not m:
        raise DeployError(f"`flwr run` did not start a run: {out.strip()[-800:]}")
    return m.group(1)


def fetch_log(cli_home: Path, run_id: str, conn: str = CONNECTION, timeout: float = 60) -> str:
    try:
        p = _flwr(["log", str(run_id), conn, "--show"], cli_home, timeout)
        return p.stdout + p.stderr
    except DeployError as exc:
        return str(exc)


def wait_run(cli_home: Path, run_id: str, timeout: float, conn: str = CONNECTION,
             poll: float = 2.0, on_poll: Any = None) -> tuple[str, str]:
    """Poll the run status until it is ``finished:*`` or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    status, details = "unknown", ""
    while time.monotonic() < deadline:
        try:
            status, details = run_status(cli_home, run_id, conn)
        except DeployError as exc:
            status, details = "unknown", str(exc)
        if status.startswith("finished"):
            return status, details
        if on_poll is not None:
            on_poll(status)
        time.sleep(poll)
    return f"timeout ({status})", details


def stop_run(cli_home: Path, run_id: str, conn: str = CONNECTION) -> None:
    try:
        _flwr(["stop", str(run_id), conn], cli_home, 30)
    except DeployError:
        pass


def follow_run(cli_home: Path, run_id: str, timeout: float, on_line: Callable[[str], None] | None = None,
               conn: str = CONNECTION) -> tuple[str, str, str]:
    """Stream the run's output live (``flwr log <run> <conn>``: the ServerApp's per-round lines
    as they are printed) until the run ends or ``timeout`` s pass; returns (status, details,
    the whole log). One long-lived ``flwr log`` process instead of a ``flwr list`` process every
    few seconds (each a Python start-up competing with the federation for the CPU).

    The stream process is stopped by its PID (its own process group) whatever happens, Ctrl-C
    included. If the stream ends before the run does (a dropped connection), the status is
    polled as before."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    proc = subprocess.Popen([_bin("flwr"), "log", str(run_id), conn, "--stream"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(cli_home), start_new_session=True)

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"timeout ({run_status(cli_home, run_id, conn)[0]})", "", "".join(lines)
        reader.join(timeout=10)
        status, details = wait_run(cli_home, run_id, max(5.0, deadline - time.monotonic()), conn, poll=1.0)
        return status, details, "".join(lines)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def print_line(line: str) -> None:
    """Forward one streamed line to stdout at once (the user sees each round as it ends)."""
    sys.stdout.write(line)
    sys.stdout.flush()
