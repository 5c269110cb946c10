"""Loopback deployment vs simulation on digits-label-shift: time per round and bytes on the wire.

    python benchmarks/bench_deploy.py [--rounds 4] [--out /tmp/bench-deploy]

For each setting it runs the same run config twice:
- deployment: a SuperLink + N SuperNodes (``floral_flwr.deploy.Deployment``), the SuperNodes
  talking to the SuperLink through a byte-counting TCP proxy (everything on the wire: HTTP
  framing, protobuf, heartbeats, discovery queries, evaluation);
- simulation: ``python -m floral_flwr.launch`` (Ray) with the same number of clients.

Settings: "2-node" = 2 SuperNodes hosting clients 0 and 1 of 4 (digits-label-shift has 4
clusters, so it needs >= 4 clients) vs a 4-client simulation with fraction-train = fraction-
evaluate = 0.5 (2 clients train and evaluate per round in both); "6-node" = 6 SuperNodes vs a
6-client simulation. Prints a Markdown table (also written to ``<out>/results.md``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from floral_flwr.deploy.deployment import Deployment  # noqa: E402


def _cfg(out: Path, name: str, rounds: int, extra: str) -> str:
    # one message per client and round ('mean'; secagg sends 4) unless the caller chooses
    aggregation = "" if "aggregation=" in extra else "aggregation='mean' "
    return (f"task='digits-label-shift' num-server-rounds={rounds} eval-every={rounds} batch-size=16 "
            f"output-dir='{out}' run-name='{name}' node-wait-timeout=300.0 reply-timeout=600.0 "
            f"{aggregation}{extra}").strip()


def _per_round(run_dir: Path) -> dict:
    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    secs = [float(r["round-s"]) for r in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "rounds": len(rows),
        "first-round-s": secs[0],
        "median-round-s": statistics.median(secs[1:-1] or secs),  # warm training-only rounds
        "last-round-s": secs[-1],  # includes the evaluation
        "payload-up": summary.get("bytes-up-per-round"),
        "payload-down": summary.get("bytes-down-per-round"),
        "params": summary.get("parameters", summary.get("parameter-report")),
    }


def deployment(out: Path, name: str, nodes: int, partitions: int, rounds: int, extra: str) -> dict:
    work = out / f"work-{name}"
    t0 = time.monotonic()
    with Deployment(work, nodes, partitions, state_root=work / "state", proxy=True) as d:
        run_id = d.submit(ROOT, _cfg(out, name, rounds, extra + f" min-available-nodes={nodes}"))
        marks: dict[int, tuple[int, int]] = {}  # rounds recorded -> proxy byte counts at that time

        def on_poll(_status: str) -> None:
            p = out / name / "rounds.csv"
            done = max(0, len(p.read_text().splitlines()) - 1) if p.exists() else 0
            marks.setdefault(done, d.byte_counter.snapshot())

        status, details = d.wait(run_id, 3600, on_poll=on_poll)
        up, down = d.byte_counter.snapshot() if d.byte_counter else (0, 0)
    res = _per_round(out / name)
    warm = [(marks[r + 1][0] - marks[r][0], marks[r + 1][1] - marks[r][1])
            for r in range(1, rounds - 1) if r in marks and r + 1 in marks]
    res.update(status=status, wall_s=time.monotonic() - t0, wire_up=up, wire_down=down,
               warm_wire=[statistics.median(x) for x in zip(*warm)] if warm else None)
    return res


def simulation(out: Path, name: str, clients: int, rounds: int, extra: str) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "floral_flwr.launch", "--num-supernodes", str(clients),
                        "--work-dir", str(out / f"work-{name}"),
                        "--run-config", _cfg(out, name, rounds, extra + f" min-available-nodes={clients}")],
                       cwd=ROOT, capture_output=True, text=True, timeout=3600)
    res = _per_round(out / name)
    res.update(status="finished:completed" if p.returncode == 0 else f"rc {p.returncode}",
               wall_s=time.monotonic() - t0)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="/tmp/bench-deploy")
    ap.add_argument("--only", choices=["2", "6"], default=None)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    if a.only in (None, "2"):
        results["2-node deployment"] = deployment(out, "dep2", 2, 4, a.rounds, "")
        results["2-of-4 simulation"] = simulation(out, "sim2", 4, a.rounds, "fraction-train=0.5 fraction-evaluate=0.5")
    if a.only in (None, "6"):
        results["6-node deployment"] = deployment(out, "dep6", 6, 6, a.rounds, "")
        results["6-client simulation"] = simulation(out, "sim6", 6, a.rounds, "")
    load = os.getloadavg()
    lines = [f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", "",
             "| setting | status | wall s | round 1 s | median warm round s | last round (with eval) s | "
             "payload up/down per round (summary.json) | wire up/down per round, whole run (proxy) | "
             "wire up/down, warm training round (proxy) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        wire = (f"{r['wire_up'] / r['rounds']:,.0f} / {r['wire_down'] / r['rounds']:,.0f}"
                if "wire_up" in r else "n/a (in-process)")
        warm = (f"{r['warm_wire'][0]:,.0f} / {r['warm_wire'][1]:,.0f}" if r.get("warm_wire") else "n/a")
        lines.append(f"| {k} | {r['status']} | {r['wall_s']:.0f} | {r['first-round-s']:.1f} | "
                     f"{r['median-round-s']:.1f} | {r['last-round-s']:.1f} | "
                     f"{r['payload-up']:,.0f} / {r['payload-down']:,.0f} | {wire} | {warm} |")
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n\n```json\n" + json.dumps(results, indent=1, default=str) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
