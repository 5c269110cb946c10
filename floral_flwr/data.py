"""Dataset helper for the MNIST/CIFAR tasks (``floral_flwr.tasks``).

    python -m floral_flwr.data download <name> <dir>   # machine with internet: hub -> parquet
    python -m floral_flwr.data check <name> <dir>      # validate + decode a local copy
    python -m floral_flwr.data fake <name> <dir> [--train N] [--test M] [--seed S]
                                                       # random images in the hub schema
    python -m floral_flwr.data list                    # names, hub ids and columns
    python -m floral_flwr.data prepare wordnet <dir> [--from PATH]
                                                       # WordNet noun definitions (Debian
                                                       # wordnet-base) for the text tasks

``<name>`` is one of ``mnist``, ``cifar10``, ``cifar100``. ``download`` writes
``<dir>/train.parquet`` and ``<dir>/test.parquet`` in the exact Hugging Face hub schema (image
column ``{bytes, path}`` + label columns), which is what ``data-dir`` (run config) or
``data-path`` (SuperNode node config) expect; see ``floral_flwr.tasks.sources`` for the layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from floral_flwr.tasks.sources import (DATASETS, download_dataset, load_split_arrays,
                                       write_fake_dataset)

__all__ = ["main", "download_dataset", "write_fake_dataset"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:2] == ["prepare", "wordnet"]:  # the text tasks' data (floral_flwr.tasks.wordnet)
        return prepare_wordnet_main(args[2:])
    ap = argparse.ArgumentParser(prog="python -m floral_flwr.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch from the Hugging Face hub (needs internet)")
    d.add_argument("name", choices=sorted(DATASETS))
    d.add_argument("dir")
    c = sub.add_parser("check", help="validate and decode a local copy")
    c.add_argument("name", choices=sorted(DATASETS))
    c.add_argument("dir")
    f = sub.add_parser("fake", help="write random images in the hub schema")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("dir")
    f.add_argument("--train", type=int, default=600)
    f.add_argument("--test", type=int, default=100)
    f.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="known datasets")
    a = ap.parse_args(argv)

    if a.cmd == "list":
        for n, s in DATASETS.items():
            cols = ", ".join([s.image_column, s.label_column, *s.extra_columns])
            print(f"{n:9s} hub={s.hub_id:18s} columns: {cols}")
        return 0
    if a.cmd == "download":
        t = time.perf_counter()
        try:
            out = download_dataset(a.name, a.dir)
        except Exception as e:  # noqa: BLE001 - CLI: one readable line
            print(f"error: downloading {a.name} ({DATASETS[a.name].hub_id}) failed: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"wrote {out}/train.parquet and {out}/test.parquet in {time.perf_counter() - t:.1f} s")
        return 0
    if a.cmd == "fake":
        out = write_fake_dataset(a.name, a.dir, a.train, a.test, a.seed)
        print(f"wrote {out}/train.parquet ({a.train} rows) and {out}/test.parquet ({a.test} rows)")
        return 0
    # check
    spec = DATASETS[a.name]
    try:
        for split in ("train", "test"):
            p = Path(a.dir) / f"{split}.parquet"
            if not p.is_file():
                raise ValueError(f"{p}: missing")
            t = time.perf_counter()
            x, y = load_split_arrays(p, spec)
            print(f"{p}: {len(y)} rows, images {x.shape[1:]} uint8, labels 0..{int(y.max())}, "
                  f"decoded in {time.perf_counter() - t:.1f} s")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def prepare_wordnet_main(argv: list[str]) -> int:
    from floral_flwr.tasks.wordnet import WordNetError, prepare_wordnet

    ap = argparse.ArgumentParser(prog="python -m floral_flwr.data prepare wordnet",
                                 description="WordNet 3.0 noun definitions labelled by supersense")
    ap.add_argument("dir")
    ap.add_argument("--from", dest="source", default=None, metavar="PATH",
                    help="WordNet's data.noun (or its directory) instead of Debian's wordnet-base")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    try:
        out, rows = prepare_wordnet(a.dir, a.source)
    except (WordNetError, OSError) as e:
        print(f"error: prepare wordnet: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {rows} noun definitions (wordnet-nouns.tsv, manifest.json) in "
          f"{time.perf_counter() - t:.1f} s; use it with data-dir=\"{out}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
