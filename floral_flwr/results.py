"""What every run leaves behind (design.md §5), checkpoints, and the progress line.

``<output-dir>/<run-name>/``
- ``config.json``   resolved run config, package versions, seed, git revision
- ``rounds.csv``    one row per round
- ``clients.csv``   one row per (evaluation round, client); the mixture columns ``p0..`` only
                    with run config ``report-mixtures`` (else no client's mixture is known here)
- ``summary.json``  final metrics, wall time, parameter report, communication per round
- ``checkpoint/``   ``state.npz`` (global arrays), ``optimizer.npz`` (server optimizer),
                    ``meta.json`` (round, rng, wall time); written atomically every round
- ``plots/``        ``metric.png`` (personalized metric per round), ``loss.png``,
                    ``mixtures.png`` (clients x adaptors heatmap sorted by true cluster; only
                    with ``report-mixtures``)

Checkpoints are ``.npz`` read with ``allow_pickle=False`` and JSON: nothing is unpickled.
"""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from floral_flwr.fileio import atomic_write_bytes, load_npz, save_npz

ROUND_FIELDS = [
    "round", "elapsed-s", "round-s", "train-loss", "sampled", "received", "failures", "rejected",
    "metric", "mean", "std", "worst10", "weighted", "cluster-ari", "bytes-up", "bytes-down",
]


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("flwr", "torch", "numpy", "flwr-datasets", "scikit-learn", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class RunRecorder:
    """Writes the results contract of one run and reads its checkpoint back."""

    def __init__(self, run_dir: Path, metric: str, num_rounds: int, start_round: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.metric = metric
        self.num_rounds = num_rounds
        self.start_round = start_round
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.plots_dir = self.run_dir / "plots"
        self.t_start = time.monotonic()
        self.elapsed_before = 0.0  # wall time of the interrupted part when resuming
        self.final: dict[str, Any] = {}
        self.parameter_report: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def prepare(self, config: dict[str, Any], resume: bool) -> None:
        """Create the run directory (checks it is writable) and write config.json."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        probe = self.run_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
        info = {"config": config, "versions": _versions(), "git-revision": _git_revision(),
                "resumed": resume, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        name = "config.json" if not (resume and (self.run_dir / "config.json").exists()) else "config-resume.json"
        atomic_write_bytes(self.run_dir / name, json.dumps(info, indent=2, default=str).encode())
        if not resume:
            for f in ("rounds.csv", "clients.csv"):
                (self.run_dir / f).unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoint

    def has_checkpoint(self) -> bool:
        return (self.ckpt_dir / "meta.json").exists()

    def save_checkpoint(self, server_round: int, arrays: dict[str, np.ndarray],
                        optimizer: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        # state and optimizer first, meta last: meta.json names a round only once both exist
        save_npz(self.ckpt_dir / f"state-{server_round:06d}.npz", arrays)
        save_npz(self.ckpt_dir / f"optimizer-{server_round:06d}.npz", optimizer)
        meta = {"round": server_round, "elapsed-s": self.elapsed(), **extra}
        atomic_write_bytes(self.ckpt_dir / "meta.json", json.dumps(meta, indent=2).encode())
        for p in self.ckpt_dir.glob("*-*.npz"):
            if not p.name.endswith(f"-{server_round:06d}.npz"):
                p.unlink(missing_ok=True)

    def latest_state(self) -> dict[str, np.ndarray]:
        """The global arrays of the newest checkpoint (no side effects)."""
        meta = json.loads((self.ckpt_dir / "meta.json").read_text())
        return load_npz(self.ckpt_dir / f"state-{int(meta['round']):06d}.npz")

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        meta = json.loads((self.ckpt_dir / "meta.json").read_text())
        rnd = int(meta["round"])
        arrays = load_npz(self.ckpt_dir / f"state-{rnd:06d}.npz")
        optimizer = load_npz(self.ckpt_dir / f"optimizer-{rnd:06d}.npz")
        self.elapsed_before = float(meta.get("elapsed-s", 0.0))
        return rnd, arrays, optimizer, meta

    def truncate_after(self, server_round: int) -> None:
        """On resume: drop result rows of rounds after the checkpoint (they will be redone)."""
        for name, col in (("rounds.csv", "round"), ("clients.csv", "round")):
            path = self.run_dir / name
            if not path.exists():
                continue
            with path.open() as f:
                rows = list(csv.DictReader(f))
            if not rows:
                continue
            keep = [r for r in rows if int(r[col]) <= server_round]
            fields = list(rows[0].keys())
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(keep)

    # ------------------------------------------------------------------ per round

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t_start

    def _append(self, name: str, fields: list[str], rows: list[dict[str, Any]]) -> None:
        path = self.run_dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)

    def record_round(self, stats: Any, num_adaptors: int) -> dict[str, Any]:
        """Append rounds.csv (+ clients.csv on eval rounds); print the progress line."""
        m = self.metric
        s = stats.eval_summary
        row = {
            "round": stats.server_round,
            "elapsed-s": round(self.elapsed(), 3),
            "round-s": round(stats.seconds_train + stats.seconds_eval, 3),
            "train-loss": stats.train_loss,
            "sampled": stats.sampled,
            "received": stats.received,
            "failures": stats.failures,
            "rejected": stats.rejected,
            "metric": m,
            "mean": s.get(f"{m}-mean", ""),
            "std": s.get(f"{m}-std", ""),
            "worst10": s.get(f"{m}-worst10", ""),
            "weighted": s.get(f"{m}-weighted", ""),
            "cluster-ari": s.get("cluster-ari", ""),
            "bytes-up": stats.bytes_up,
            "bytes-down": stats.bytes_down,
        }
        self._append("rounds.csv", ROUND_FIELDS, [row])
        if stats.eval_rows:
            # p columns only when clients reported their mixtures (run config report-mixtures)
            reported = any(r.get("mixture") for r in stats.eval_rows)
            mix_cols = [f"p{c}" for c in range(num_adaptors)] if reported else []
            fields = ["round", "client-id", "true-cluster", m, "loss", "num-examples", *mix_cols]
            rows = []
            for r in stats.eval_rows:
                out = {"round": stats.server_round, "client-id": r.get("client-id", -1),
                       "true-cluster": r.get("true-cluster", -1), m: r[m], "loss": r["loss"],
                       "num-examples": r["num-examples"]}
                mix = r.get("mixture") or []
                for c, col in enumerate(mix_cols):
                    out[col] = mix[c] if c < len(mix) else ""
                rows.append(out)
            self._append("clients.csv", fields, rows)
            self.final = {"round": stats.server_round, **s}
        self.progress(stats)
        return row

    def progress(self, stats: Any) -> None:
        done = stats.server_round - self.start_round + 1
        todo = self.num_rounds - stats.server_round
        spent = time.monotonic() - self.t_start
        eta = spent / max(done, 1) * todo
        s = stats.eval_summary
        ev = f"{self.metric} {s[f'{self.metric}-mean']:.4f}" if s else f"{self.metric} -"
        ari = f" | ARI {s['cluster-ari']:.2f}" if "cluster-ari" in s else ""
        bad = f" | failed {stats.failures} rejected {stats.rejected}" if stats.failures or stats.rejected else ""
        print(
            f"[floral] round {stats.server_round}/{self.num_rounds} | elapsed {_fmt_secs(self.elapsed())} "
            f"| ETA {_fmt_secs(eta)} | train loss {stats.train_loss:.4f} | {ev}{ari}{bad}",
            flush=True,
        )

    # ------------------------------------------------------------------ end of run

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        summary = {
            "metric": self.metric,
            "final": self.final,
            "wall-time-s": round(self.elapsed(), 3),
            "parameters": self.parameter_report,
            **extra,
        }
        atomic_write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=float).encode())
        return summary

    def write_plots(self) -> list[Path]:
        """Metric/loss curves and the mixture heatmap (skipped quietly without matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return []
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        out: list[Path] = []
        rounds_path = self.run_dir / "rounds.csv"
        if rounds_path.exists():
            with rounds_path.open() as f:
                rows = list(csv.DictReader(f))
            ev = [r for r in rows if r["mean"] != ""]
            if ev:
                fig, ax = plt.subplots(figsize=(6, 4))
                x = [int(r["round"]) for r in ev]
                for col, label in (("mean", "mean"), ("worst10", "worst 10 %")):
                    ax.plot(x, [float(r[col]) for r in ev], marker="o", ms=3, label=label)
                if ev[0]["cluster-ari"] != "":
                    ax.plot(x, [float(r["cluster-ari"]) for r in ev], ls="--", label="cluster ARI")
                ax.set_xlabel("round")
                ax.set_ylabel(f"personalized {self.metric}")
                ax.grid(alpha=0.3)
                ax.legend()
                fig.tight_layout()
                p = self.plots_dir / "metric.png"
                fig.savefig(p, dpi=120)
                plt.close(fig)
                out.append(p)
            tr = [r for r in rows if r["train-loss"] not in ("", "nan")]
            if tr:
                fig, ax = plt.subplots(figsize=(6, 4))
                ax.plot([int(r["round"]) for r in tr], [float(r["train-loss"]) for r in tr])
                ax.set_xlabel("round")
                ax.set_ylabel("train loss")
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
                fig.tight_layout()
                p = self.plots_dir / "loss.png"
                fig.savefig(p, dpi=120)
                plt.close(fig)
                out.append(p)
        clients_path = self.run_dir / "clients.csv"
        if clients_path.exists():
            with clients_path.open() as f:
                rows = list(csv.DictReader(f))
            if rows:
                last = max(int(r["round"]) for r in rows)
                rows = [r for r in rows if int(r["round"]) == last]
                cols = [c for c in rows[0] if c.startswith("p") and c[1:].isdigit()]
                if cols and all(r[c] != "" for r in rows for c in cols):
                    rows.sort(key=lambda r: (int(r["true-cluster"]), int(r["client-id"])))
                    mat = np.array([[float(r[c]) for c in cols] for r in rows])
                    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(cols), 1.5 + 0.18 * len(rows)))
                    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
                    ax.set_xticks(range(len(cols)), [f"adaptor {c[1:]}" for c in cols], rotation=45)
                    ax.set_yticks(
                        range(len(rows)), [f"client {r['client-id']} (c{r['true-cluster']})" for r in rows], fontsize=6
                    )
                    ax.set_title(f"mixtures, round {last}")
                    fig.colorbar(im, ax=ax)
                    fig.tight_layout()
                    p = self.plots_dir / "mixtures.png"
                    fig.savefig(p, dpi=120)
                    plt.close(fig)
                    out.append(p)
        return out
