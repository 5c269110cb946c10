"""Plot traces of ``diagnose_divergence.py`` side by side: train loss and client update norms.

    python benchmarks/plot_divergence.py OUT.png LABEL=TRACE_DIR [LABEL=TRACE_DIR ...]

Top: the replies' mean train loss per round (log scale). Bottom: the median and the largest
client update ||reply - sent|| per round (log scale). A run that diverges shows the largest
update growing round after round while the median stays flat: a few clients' steps blow up first.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path


def _read(trace: Path) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {}
    with (trace / "rounds.csv").open() as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    x = math.nan
                cols.setdefault(k, []).append(x if math.isfinite(x) else math.nan)
    return cols


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_upd) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for item in argv[1:]:
        label, _, path = item.partition("=")
        c = _read(Path(path))
        line, = ax_loss.plot(c["round"], c["train_loss"], lw=0.8, label=label)
        if "max_update_l2" in c:
            ax_upd.plot(c["round"], c["max_update_l2"], lw=0.8, color=line.get_color(), label=f"{label}: largest")
            ax_upd.plot(c["round"], c["median_update_l2"], lw=0.8, ls=":", color=line.get_color(),
                        label=f"{label}: median")
    # cut at 1e3 so the calm rounds stay readable; a blow-up leaves the chart (it reaches 1e30+)
    ax_loss.set_yscale("log")
    ax_loss.set_ylim(top=1e3)
    ax_loss.set_ylabel("train loss (replies' mean)")
    ax_loss.legend(fontsize=8)
    ax_upd.set_yscale("log")
    ax_upd.set_ylim(top=1e3)
    ax_upd.set_ylabel("client update L2 norm")
    ax_upd.set_xlabel("round")
    ax_upd.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(argv[0], dpi=120)
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
