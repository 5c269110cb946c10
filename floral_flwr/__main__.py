"""``python -m floral_flwr list tasks|methods|keys`` and ``python -m floral_flwr version``.

Everything printed comes from the registries the run-config validator uses: tasks from
``floral_flwr.tasks`` (``TASK_NAMES``, ``task_info``: metric, clusters, presets), methods from
``floral_flwr.methods.METHOD_SPECS``, keys from ``floral_flwr.config`` (``DEFAULTS``, the allowed
values in ``CHOICES``, one line each in ``KEY_HELP``; README's "Run config" has the long form).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable, Sequence


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def describe_task(name: str) -> str:
    """What a task name means (the naming scheme of ``floral_flwr.tasks``)."""
    base = name.removesuffix("-reduced")
    if base.startswith("synthetic-"):
        kind = base.split("-")[1]
        text = f"the paper's synthetic {'linear' if kind == 'linear' else 'MLP'} regression generator"
        if base.endswith("-simple"):
            text += ", simple variant"
        elif base.endswith("-bn"):
            text += ", with batch norm"
    else:
        data = {"digits": "scikit-learn digits (bundled, offline)", "mnist": "MNIST (local parquet, data-dir)",
                "fmnist": "Fashion-MNIST (local parquet, data-dir)",
                "cifar10": "CIFAR-10 (local parquet, data-dir)",
                "cifar100": "CIFAR-100 (local parquet, data-dir)"}.get(base.split("-")[0], "image data (local parquet, data-dir)")
        if "-rotate" in base:
            shift = "clusters rotate the images by 0/90/180/270 degrees"
        elif "-label-shift" in base:
            shift = "clusters shift the labels y -> (y + c) mod classes"
        else:
            shift = "cluster c holds the labels l with l mod C == c"
        norm = {"-bn": ", VGG-8 with batch norm", "-gn": ", VGG-8 with group norm"}
        text = f"{data}; {shift}" + next((v for k, v in norm.items() if base.endswith(k)), "")
    if name.endswith("-reduced"):
        text += "; 5 % of each client's training rows"
    return text


def list_tasks() -> str:
    from floral_flwr.tasks import TASK_NAMES, task_info

    rows = []
    for name in TASK_NAMES:
        info = task_info(name)
        d = info.defaults
        rows.append([name, info.metric, info.num_clusters or "-", d.get("num-clients", "-"),
                     d.get("num-server-rounds", "-"), describe_task(name)])
    return _table(["task", "metric", "clusters", "clients", "rounds", "what"], rows) + (
        "\n\nclients/rounds: the task's preset (--num-supernodes / num-server-rounds override them);"
        "\na task needs at least one client per cluster."
    )


def list_methods() -> str:
    from floral_flwr.methods import METHOD_SPECS

    rows = [[name, "yes" if spec.needs_clusters else "", spec.description] for name, spec in METHOD_SPECS.items()]
    return _table(["method", "oracle", "what"], rows) + (
        "\n\noracle: uses the true clusters (needs a clustered task and num-adaptors >= its clusters)."
    )


def list_keys() -> str:
    from floral_flwr.config import AUTO, CHOICES, DEFAULTS, KEY_HELP, RANK_WORDS

    rows = []
    for key, default in DEFAULTS.items():
        shown = repr(default) if isinstance(default, str) else str(default).lower() if isinstance(default, bool) else default
        allowed = ", ".join(CHOICES[key]) if key in CHOICES else ""
        if key == "rank":
            allowed = "int >= 1, float in (0, 1], " + ", ".join(RANK_WORDS)
        help_ = KEY_HELP[key] + (f" [{allowed}]" if allowed else "")
        rows.append([key, shown, help_])
    return _table(["key", "default", "meaning"], rows) + (
        f"\n\n{AUTO!r} = the task's preset. Set with --run-config \"key=value ...\" (strings in single quotes)."
    )


def version_text() -> str:
    from floral_flwr import __version__
    from floral_flwr.provenance import PACKAGE_DIR, git_revision, source_hash

    return (f"floral-flwr {__version__}\ngit revision: {git_revision(PACKAGE_DIR.parent) or '- (not a git checkout)'}\n"
            f"source sha256: {source_hash()}  (config.json 'source-sha256' of a run of this code)")


LISTS = {"tasks": list_tasks, "methods": list_methods, "keys": list_keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m floral_flwr", description="What floral-flwr can run.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list tasks, methods or run-config keys")
    ls.add_argument("what", metavar="tasks|methods|keys")
    sub.add_parser("version", help="version, git revision and source hash of this code")
    a = p.parse_args(argv)
    if a.cmd == "list" and a.what not in LISTS:
        from floral_flwr.config import nearest

        near = nearest(a.what, LISTS)
        p.error(f"list {a.what!r}: choose tasks, methods or keys" + (f"; did you mean {near!r}?" if near else ""))
    try:
        print(LISTS[a.what]() if a.cmd == "list" else version_text())
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
