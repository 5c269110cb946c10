"""Connection files and ``flwr`` CLI calls: a private FLWR_HOME with one connection to the
SuperLink (``write_connection``), then ``flwr supernode register``, ``flwr run`` (``submit``),
``flwr list`` (``run_status``, ``wait_run``), ``flwr log`` and ``flwr stop``."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

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
