# size: the whole results contract of one run in one place: its files, checkpoint, per-round line, closing table and plots.
"""What every run leaves behind (design.md §5), checkpoints, and the progress line.

``<output-dir>/<run-name>/``
- ``config.json``   resolved run config and provenance: package versions, host (CPUs, torch
                    threads, CUDA devices), source revision (git, else a hash of the app's files)
- ``rounds.csv``    one row per round
- ``clients.csv``   one row per (evaluation round, client); the mixture columns ``p0..`` only
                    with run config ``report-mixtures`` (else no client's mixture is known here)
- ``summary.json``  final metrics, wall time, parameter report, communication per round
- ``checkpoint/``   ``state.npz`` (global arrays), ``optimizer.npz`` (server optimizer),
                    ``meta.json`` (round, rng, wall time); written atomically every round
- ``plots/``        ``metric.png`` (personalized metric per round), ``loss.png``,
                    ``mixtures.png`` (clients x adaptors heatmap sorted by true cluster; only
                    with ``report-mixtures``)
- ``events.out.tfevents.*`` TensorBoard scalars per round (metric, worst 10 %, ARI, train loss,
                    bytes), only when ``tensorboard`` is installed (``pip install tensorboard``)

config.json and summary.json are world-readable (0644) like any result file; checkpoints and
private client state keep the owner-only mode of their atomic writes.

Checkpoints are ``.npz`` read with ``allow_pickle=False`` and JSON: nothing is unpickled.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from floral_flwr.fileio import atomic_write_bytes, load_npz, save_npz
from floral_flwr.provenance import git_revision_of_source, versions
from floral_flwr.rundir import Checkpoints

RESULT_FILE_MODE = 0o644  # config.json, summary.json: readable like any result file

ROUND_FIELDS = [
    "round", "elapsed-s", "round-s", "train-loss", "sampled", "received", "failures", "rejected",
    "metric", "mean", "std", "worst10", "weighted", "cluster-ari", "bytes-up", "bytes-down",
]


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _write_result(path: Path, data: bytes) -> None:
    """Atomic write of a result file, readable by everyone (the temp file is owner-only)."""
    atomic_write_bytes(path, data)
    os.chmod(path, RESULT_FILE_MODE)


class RunRecorder:
    """Writes the results contract of one run and reads its checkpoint back.

    ``label`` prefixes every line it prints (the method name, so that a log says which method
    ran); ``eval_every`` lets the ETA know which of the remaining rounds also evaluate.
    """

    def __init__(self, run_dir: Path, metric: str, num_rounds: int, start_round: int = 1,
                 label: str = "floral", eval_every: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.metric = metric
        self.num_rounds = num_rounds
        self.start_round = start_round
        self.label = label
        self.eval_every = eval_every
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.plots_dir = self.run_dir / "plots"
        self.t_start = time.monotonic()
        self.elapsed_before = 0.0  # wall time of the interrupted part when resuming
        self.final: dict[str, Any] = {}
        self.parameter_report: dict[str, Any] = {}
        self.startup_s: float | None = None  # start-up + the first round of this process
        self._last_elapsed: float | None = None
        self._durations: list[tuple[float, bool]] = []  # (seconds, evaluated) after the first round
        self._tb: Any = None  # TensorBoard writer, when tensorboard is installed
        self.provenance: dict[str, Any] = {}  # what prepare() recorded (versions, host, source)

    def say(self, text: str) -> None:
        print(f"[{self.label}] {text}", flush=True)

    # ------------------------------------------------------------------ setup

    def prepare(self, config: dict[str, Any], resume: bool, provenance: dict[str, Any] | None = None) -> None:
        """Create the run directory (checks it is writable) and write config.json."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        probe = self.run_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
        prov = provenance if provenance is not None else {"versions": versions(), "git-revision": git_revision_of_source()}
        self.provenance = prov
        info = {"config": config, **prov, "resumed": resume, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        name = "config.json" if not (resume and (self.run_dir / "config.json").exists()) else "config-resume.json"
        _write_result(self.run_dir / name, json.dumps(info, indent=2, default=str).encode())
        if not resume:
            for f in ("rounds.csv", "clients.csv"):
                (self.run_dir / f).unlink(missing_ok=True)
            for f in self.run_dir.glob("events.out.tfevents.*"):
                f.unlink()

    # ------------------------------------------------------------------ checkpoint

    def has_checkpoint(self) -> bool:
        return Checkpoints(self.ckpt_dir, self.label).exists()

    def save_checkpoint(self, server_round: int, arrays: dict[str, np.ndarray],
                        optimizer: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        # the last two rounds are kept; a non-finite state is refused (floral_flwr.rundir)
        Checkpoints(self.ckpt_dir, self.label).save(server_round, arrays, optimizer, {"elapsed-s": self.elapsed(), **extra})

    def latest_state(self) -> dict[str, np.ndarray]:
        """The global arrays of the newest readable checkpoint (no side effects)."""
        return Checkpoints(self.ckpt_dir, self.label).latest_state()

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        rnd, arrays, optimizer, meta = Checkpoints(self.ckpt_dir, self.label).load()
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
        self._log_tensorboard(row)
        self.progress(stats)
        return row

    def _is_eval_round(self, rnd: int) -> bool:
        if self.eval_every is None:
            return rnd == self.num_rounds
        return rnd % self.eval_every == 0 or rnd == self.num_rounds

    def eta_seconds(self, server_round: int) -> float | None:
        """Seconds left after ``server_round``: the remaining training-only and evaluation rounds,
        each at the median of the last 10 such rounds. The first round of a process is left out
        (it carries the engine's start-up and the clients' set-up). None until one round after
        the first has been timed."""
        if not self._durations:
            return None
        plain = [d for d, ev in self._durations if not ev][-10:]
        evals = [d for d, ev in self._durations if ev][-10:]
        per_plain = statistics.median(plain) if plain else statistics.median(evals)
        per_eval = statistics.median(evals) if evals else per_plain
        rest = range(server_round + 1, self.num_rounds + 1)
        n_eval = sum(1 for r in rest if self._is_eval_round(r))
        return (len(rest) - n_eval) * per_plain + n_eval * per_eval

    def _time_round(self, stats: Any) -> float:
        now = self.elapsed()
        last, self._last_elapsed = self._last_elapsed, now
        if last is None:  # first round of this process: start-up included
            self.startup_s = now - self.elapsed_before
            return self.startup_s
        took = now - last
        self._durations.append((took, bool(stats.eval_summary)))
        return took

    def progress(self, stats: Any) -> None:
        """One line per round: round/N, elapsed, time per round and ETA (or the start-up time
        on the first round), train loss, and on evaluation rounds the personalized metric."""
        took = self._time_round(stats)
        rnd = stats.server_round
        s = stats.eval_summary
        m = self.metric
        parts = [f"round {rnd}/{self.num_rounds}", f"elapsed {_fmt_secs(self.elapsed())}"]
        if len(self._durations) == 0:
            parts.append(f"start-up + round {rnd}: {took:.1f} s (engine, clients' set-up)")
        else:
            recent = statistics.median(d for d, _ in self._durations[-10:])
            eta = self.eta_seconds(rnd)
            parts.append(f"{recent:.2f} s/round")
            parts.append(f"ETA {_fmt_secs(eta) if eta is not None else '-'}")
        parts.append(f"train loss {stats.train_loss:.4f}")
        if s:
            parts.append(f"{m} {s[f'{m}-mean']:.4f} (worst 10 % {s.get(f'{m}-worst10', float('nan')):.4f})")
            if "cluster-ari" in s:
                parts.append(f"ARI {s['cluster-ari']:.2f}")
        if stats.failures or stats.rejected or stats.received < stats.sampled:
            parts.append(f"replies {stats.received}/{stats.sampled}, failed {stats.failures}, "
                         f"rejected {stats.rejected}")
        self.say(" | ".join(parts))

    # ------------------------------------------------------------------ TensorBoard

    def _tensorboard(self) -> Any:
        if self._tb is None:
            self._tb = tensorboard_writer(self.run_dir) or False
        return self._tb

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        tb = self._tensorboard()
        if not tb:
            return
        rnd = int(row["round"])
        scalars = {"train/loss": row["train-loss"], f"{self.metric}/mean": row["mean"],
                   f"{self.metric}/worst10": row["worst10"], "cluster/ari": row["cluster-ari"],
                   "bytes/up": row["bytes-up"], "bytes/down": row["bytes-down"],
                   "time/round-s": row["round-s"]}
        for tag, v in scalars.items():
            if v not in ("", None) and v == v:  # skip blanks and NaN
                tb.add_scalar(tag, float(v), rnd)
        tb.flush()

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None

    # ------------------------------------------------------------------ end of run

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        summary = {
            "metric": self.metric,
            "final": self.final,
            "wall-time-s": round(self.elapsed(), 3),
            "parameters": self.parameter_report,
            **extra,
        }
        _write_result(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=float).encode())
        self.close()
        return summary

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """The closing table: final metric, worst 10 %, ARI, rounds, wall time, where results are."""
        m = self.metric
        f = summary.get("final") or {}

        def num(key: str, fmt: str = ".4f") -> str:
            v = f.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

        rounds = f"{summary.get('rounds', self.num_rounds)}"
        if self._durations:
            rounds += f" ({statistics.median(d for d, _ in self._durations):.2f} s/round after start-up)"
        wall = _fmt_secs(summary.get("wall-time-s", self.elapsed()))
        if self.startup_s is not None:
            wall += f" (start-up + first round {self.startup_s:.1f} s)"
        rows = [
            ("run", f"{summary.get('task', '?')} | {summary.get('method', self.label)} | seed {summary.get('seed', '?')}"),
            (f"final {m}", f"{num(f'{m}-mean')} (round {f.get('round', '-')}, mean over evaluated clients)"),
            ("worst 10 %", num(f"{m}-worst10")),
            ("cluster ARI", num("cluster-ari", ".3f") if "cluster-ari" in f else "- (no clusters or not a mixture method)"),
            ("rounds", rounds),
            ("wall time", wall),
            ("results", str(self.run_dir)),
        ]
        width = max(len(k) for k, _ in rows)
        return ["summary"] + [f"  {k:<{width}}  {v}" for k, v in rows]

    def print_summary(self, summary: dict[str, Any]) -> None:
        for line in self.summary_lines(summary):
            self.say(line)

    def write_plots(self, title: str = "") -> list[Path]:
        """Metric/loss curves and the mixture heatmap (skipped quietly without matplotlib);
        ``title`` (task / method / seed) heads every plot."""
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
                ax.set_title(f"{title}: personalized {self.metric}" if title else f"personalized {self.metric}")
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
                ax.set_title(f"{title}: train loss" if title else "train loss")
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
                    ax.set_title(f"{title}: mixtures, round {last}" if title else f"mixtures, round {last}",
                                 fontsize=8)
                    fig.colorbar(im, ax=ax)
                    fig.tight_layout()
                    p = self.plots_dir / "mixtures.png"
                    fig.savefig(p, dpi=120)
                    plt.close(fig)
                    out.append(p)
        return out


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``log_dir``, or None when the
    optional ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))
