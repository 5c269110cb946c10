"""Run the app with ``flwr run`` on a private, throw-away simulation SuperLink.

``python -m floral_flwr.launch [--num-supernodes 20] [--run-config "k=v ..."]`` does what a
careful user does by hand, and nothing more:

1. sets the offline-safe environment (no telemetry, no update check, no per-run ``uv sync``);
2. starts ``flower-superlink --simulation`` on free loopback ports, in its own process group,
   with a private ``FLWR_HOME`` (never touches ``~/.flwr`` or a SuperLink someone else runs);
3. ``flwr run <app> <connection> --stream`` with the given run config and federation config;
4. decides success from the run **status** (``flwr list --format json``), because
   ``flwr run --stream`` exits 0 even when the run failed;
5. stops exactly the processes it started (by process group of the recorded PID).

Exit code 0 only when the run status is ``finished:completed``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


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


def launch(
    app_dir: str,
    run_config: str = "",
    num_supernodes: int = 20,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    timeout: float = 3600.0,
    work_dir: str | None = None,
) -> int:
    """Run the app once on a private simulation SuperLink; returns the process exit code."""
    env = {**os.environ, **OFFLINE_ENV}
    # the SuperLink starts `flower-superexec` (and Ray its workers) through PATH: make sure this
    # interpreter's environment comes first even when it is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    work = Path(work_dir or tempfile.mkdtemp(prefix="floral-launch-"))
    (work / "cli").mkdir(parents=True, exist_ok=True)
    port, control = free_port(), free_port()
    link_log = open(work / "superlink.log", "w")
    link = subprocess.Popen(
        [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port), "--control-api-address", f"127.0.0.1:{control}"],
        env={**env, "FLWR_HOME": str(work / "superlink")},
        stdout=link_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    print(f"[launch] SuperLink pid {link.pid} on 127.0.0.1:{port} (logs: {work / 'superlink.log'})", flush=True)
    status = "unknown"
    try:
        wait_healthy(port, 90, link)
        (work / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        cli_env = {**env, "FLWR_HOME": str(work / "cli")}
        flwr = _bin("flwr")
        fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus} client-resources-num-gpus={num_gpus}"
        cmd = [flwr, "run", app_dir, "sim", "--stream", "--federation-config", fed]
        if run_config:
            cmd += ["--run-config", run_config]
        print("[launch] " + " ".join(cmd), flush=True)
        run_id = None
        proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            m = re.search(r"started run (\d+)", line)
            if m:
                run_id = m.group(1)
            if time.monotonic() > deadline:
                proc.kill()
                print(f"[launch] timed out after {timeout:g} s", flush=True)
                break
        proc.wait()
        if run_id is None:
            print("[launch] the run was not submitted (see output above)", flush=True)
            return 2
        for _ in range(60):  # the status can trail the end of the log stream briefly
            status, details = run_status(flwr, "sim", run_id, cli_env)
            if status.startswith("finished"):
                break
            time.sleep(1)
        print(f"[launch] run {run_id}: {status} {details if status != 'finished:completed' else ''}".rstrip(), flush=True)
        return 0 if status == "finished:completed" else 1
    finally:
        stop_group(link)
        link_log.close()


def _exit_on_signal(signum: int, _frame: object) -> None:
    # turn SIGTERM/SIGINT into an exception so launch()'s `finally` stops the SuperLink group
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app", default=".", help="app directory (with pyproject.toml); default: .")
    p.add_argument("--run-config", default="", help='run-config overrides, e.g. "method=\'fedavg\' seed=1"')
    p.add_argument("--num-supernodes", type=int, default=20, help="simulated clients (default 20)")
    p.add_argument("--num-cpus", type=int, default=1, help="CPUs per ClientApp (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPU fraction per ClientApp (e.g. 0.25)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    p.add_argument("--work-dir", default=None, help="where SuperLink state and logs go (default: temp)")
    a = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a background job may inherit SIGINT ignored
        signal.signal(sig, _exit_on_signal)
    return launch(a.app, a.run_config, a.num_supernodes, a.num_cpus, a.num_gpus, a.timeout, a.work_dir)


if __name__ == "__main__":
    raise SystemExit(main())
