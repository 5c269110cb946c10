"""MNIST/CIFAR tasks end to end on tiny parquet files in the exact hub schema (PNG bytes written
with PIL + integer labels), the Flower Datasets partitioners, and the data errors. Offline."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from floral_flwr.tasks import TASK_NAMES, get_task, task_defaults, task_info
from floral_flwr.tasks.partitioners import (ClusterIidPartitioner, LabelModClusterPartitioner,
                                            LabelShiftPartitioner, RotateTransform,
                                            RotationPartitioner)
from floral_flwr.tasks.sources import (DATASETS, DatasetNotFoundError, write_fake_dataset,
                                       write_parquet_split)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TASKS = [n for n in TASK_NAMES if n.startswith(("mnist", "fmnist", "cifar"))]
SIZES = {"mnist": (240, 60), "cifar10": (120, 40), "cifar100": (300, 100),
         "fashion-mnist": (200, 40)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubdata")
    for i, (name, (ntr, nte)) in enumerate(SIZES.items()):
        write_fake_dataset(name, root / name, ntr, nte, seed=i)
    return root


@pytest.fixture(autouse=True)
def _no_default_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("FLORAL_FLWR_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("FLORAL_FLWR_DATA_DIR", raising=False)
    monkeypatch.delenv("FLORAL_FLWR_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _raw(path, spec, col=None):
    """Independent decoder (PIL, no task code) of a parquet file."""
    t = pq.read_table(path)
    blobs = [d["bytes"] for d in t.column(spec.image_column).to_pylist()]
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert(spec.mode)) for b in blobs])
    return x, np.asarray(t.column(col or spec.label_column).to_pylist(), dtype=np.int64)


def test_fake_files_have_the_hub_schema(data_root):
    for name, spec in DATASETS.items():
        schema = pq.read_schema(data_root / name / "train.parquet")
        img = schema.field(spec.image_column).type
        assert pa.types.is_struct(img)
        assert {img.field(i).name for i in range(img.num_fields)} == {"bytes", "path"}
        assert pa.types.is_integer(schema.field(spec.label_column).type)
        meta = json.loads(schema.metadata[b"huggingface"])
        assert meta["info"]["features"][spec.image_column]["_type"] == "Image"
        for c in spec.extra_columns:
            assert c in schema.names


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_image_task_builds_and_trains_one_step(name, data_root):
    task = get_task(name, num_clients=10, seed=0, data_dir=str(data_root))
    d = task.client_data(3)
    spec = task.spec
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_x.shape[1:] == (spec.channels, spec.height, spec.width)
    assert d.num_test > 0 and d.num_train > 0
    assert task.cluster_of(3) == 3 % task.num_clusters
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = d.train_x[:8], d.train_y[:8]
    if task.augment is not None:
        x = task.augment(x, torch.Generator().manual_seed(0))
        assert x.shape == d.train_x[:8].shape
    loss = task.loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert task.defaults == task_defaults(name)
    assert task.client_data(3) is d


def test_partitions_use_every_row_once_and_are_balanced(data_root):
    for name in ("mnist-rotate", "fmnist-label-shift", "cifar10-label-shift", "cifar100"):
        task = get_task(name, num_clients=10, seed=4, data_dir=str(data_root))
        ds = task.dataset
        for split, n in zip(("train", "test"), SIZES[ds]):
            parts = [task.partition_indices(k, split) for k in range(10)]
            allidx = np.concatenate(parts)
            assert len(allidx) == n and len(np.unique(allidx)) == n, (name, split)
            if name != "cifar100":
                sizes = [len(p) for p in parts]
                assert max(sizes) - min(sizes) <= 1
        assert np.bincount(task.clusters).tolist() == [10 // task.num_clusters + (c < 10 % task.num_clusters)
                                                       for c in range(task.num_clusters)]


def test_cifar100_clusters_by_fine_label_mod_c(data_root):
    task = get_task("cifar100", num_clients=20, seed=0, data_dir=str(data_root))
    assert task.num_clusters == 10
    _, y = _raw(data_root / "cifar100" / "train.parquet", DATASETS["cifar100"])
    for k in range(20):
        c = task.cluster_of(k)
        d = task.client_data(k)
        assert np.all(d.train_y.numpy() % 10 == c)
        assert np.all(d.test_y.numpy() % 10 == c)
        assert np.array_equal(d.train_y.numpy(), y[task.partition_indices(k)])  # labels unchanged
    # the two clients of cluster c share its rows
    rows = np.concatenate([task.partition_indices(k) for k in (3, 13)])
    assert np.array_equal(np.sort(rows), np.flatnonzero(y % 10 == 3))


def test_rotation_really_rotates_images(data_root):
    spec = DATASETS["mnist"]
    xr, yr = _raw(data_root / "mnist" / "train.parquet", spec)
    task = get_task("mnist-rotate", num_clients=8, seed=1, data_dir=str(data_root))
    assert task.angles == (0.0, 90.0, 180.0, 270.0)
    for k in range(8):
        c = task.cluster_of(k)
        idx = task.partition_indices(k)
        d = task.client_data(k)
        got = (d.train_x[:, 0].numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, np.rot90(xr[idx], k=c, axes=(1, 2)))
        assert np.array_equal(d.train_y.numpy(), yr[idx])
    # RGB: rotation acts on H, W only, before normalization
    spec10 = DATASETS["cifar10"]
    xc, _ = _raw(data_root / "cifar10" / "train.parquet", spec10)
    t10 = get_task("cifar10-rotate", num_clients=4, seed=0, data_dir=str(data_root))
    d = t10.client_data(1)
    m = torch.tensor(spec10.mean).view(1, 3, 1, 1)
    s = torch.tensor(spec10.std).view(1, 3, 1, 1)
    raw = ((d.train_x * s + m) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(raw, np.rot90(xc[t10.partition_indices(1)], 1, axes=(1, 2)))


def test_fmnist_tasks_read_fashion_mnist_under_the_paper_mnist_protocol(data_root):
    """fmnist-* = the paper's MNIST protocol (floral-method.md §2) on Fashion-MNIST's own files."""
    assert {"fmnist-rotate", "fmnist-label-shift", "fmnist-rotate-reduced",
            "fmnist-label-shift-reduced"} <= set(TASK_NAMES)
    paper = {"num-clients": 300, "fraction-train": 0.1, "fraction-evaluate": 0.1,
             "num-server-rounds": 500, "batch-size": 32, "lr": 0.1, "num-adaptors": 4}
    for shift in ("rotate", "label-shift"):
        for suffix in ("", "-reduced"):
            pre = task_defaults(f"fmnist-{shift}{suffix}")
            assert pre == task_defaults(f"mnist-{shift}{suffix}")  # incl. FLoRAL's own keys
            want = dict(paper, **({"num-server-rounds": 1500} if suffix else {}))
            assert {k: pre[k] for k in want} == want
    task = get_task("fmnist-rotate", num_clients=8, seed=1, data_dir=str(data_root))
    assert task.dataset == "fashion-mnist" and task.spec.hub_id == "zalando-datasets/fashion_mnist"
    assert task.num_clusters == 4 and task.angles == (0.0, 90.0, 180.0, 270.0)
    layers = [m for m in task.build_model().modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(784, 200), (200, 10)]
    # it reads <data-dir>/fashion-mnist, not the MNIST files next to it
    xf, yf = _raw(data_root / "fashion-mnist" / "train.parquet", DATASETS["fashion-mnist"])
    for k in (0, 5):
        idx = task.partition_indices(k)
        got = (task.client_data(k).train_x[:, 0].numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, np.rot90(xf[idx], k=k % 4, axes=(1, 2)))
    xm, _ = _raw(data_root / "mnist" / "train.parquet", DATASETS["mnist"])
    assert not np.array_equal(xf[:len(xm)], xm[:len(xf)])
    info = task_info("fmnist-label-shift-reduced")  # the server's view: no data read
    assert (info.num_clusters, info.metric) == (4, "accuracy")
    assert info.defaults == task_defaults("fmnist-label-shift-reduced")
    assert [(m.in_features, m.out_features) for m in info.build_model().modules()
            if isinstance(m, torch.nn.Linear)] == [(784, 200), (200, 10)]
    ls = get_task("fmnist-label-shift", num_clients=8, seed=1, data_dir=str(data_root))
    _, yt = _raw(data_root / "fashion-mnist" / "test.parquet", DATASETS["fashion-mnist"])
    assert np.array_equal(ls.client_data(6).test_y.numpy(),
                          (yt[ls.partition_indices(6, "test")] + 2) % 10)


def test_label_shift_maps_labels(data_root):
    _, yr = _raw(data_root / "mnist" / "test.parquet", DATASETS["mnist"])
    task = get_task("mnist-label-shift", num_clients=6, seed=0, data_dir=str(data_root),
                    shifts=[0, 3, 5, 9])
    for k in range(6):
        c = task.cluster_of(k)
        d = task.client_data(k)
        assert np.array_equal(d.test_y.numpy(), (yr[task.partition_indices(k, "test")]
                                                 + [0, 3, 5, 9][c]) % 10)


def test_reduced_keeps_five_percent_min_ten(data_root):
    full = get_task("mnist-rotate", num_clients=4, seed=0, data_dir=str(data_root))
    red = get_task("mnist-rotate-reduced", num_clients=4, seed=0, data_dir=str(data_root))
    for k in range(4):
        a, b = full.partition_indices(k), red.partition_indices(k)
        assert len(b) == max(10, round(0.05 * len(a)))
        assert set(b) <= set(a)
        assert np.array_equal(full.partition_indices(k, "test"), red.partition_indices(k, "test"))
    red2 = get_task("mnist-rotate-reduced", num_clients=4, seed=0, data_dir=str(data_root),
                    reduced_fraction=0.5)
    assert len(red2.partition_indices(0)) == round(0.5 * len(full.partition_indices(0)))
    assert red.defaults["num-server-rounds"] == 1500 and red.defaults["mixture-lr"] == 0.3


def test_partitioners_through_federated_dataset(data_root):
    from flwr_datasets import FederatedDataset

    files = {s: str(data_root / "mnist" / f"{s}.parquet") for s in ("train", "test")}
    fds = FederatedDataset(dataset="parquet", data_files=files, shuffle=False,
                           partitioners={"train": RotationPartitioner(8, 4, seed=1,
                                                                      cluster_column="cluster"),
                                         "test": LabelShiftPartitioner(8, 4, seed=1)})
    task = get_task("mnist-rotate", num_clients=8, seed=1, data_dir=str(data_root))
    p = fds.load_partition(5, "train")
    assert p.column_names == ["image", "label", "cluster"] and set(p["cluster"]) == {1}
    imgs = np.stack([np.asarray(im) for im in p["image"]])
    assert np.array_equal(imgs, (task.client_data(5).train_x[:, 0].numpy() * 255).round())
    q = fds.load_partition(6, "test")
    raw = fds.load_split("test")
    idx = fds.partitioners["test"].partition_indices(6)
    assert np.array_equal(np.asarray(q["label"]), (np.asarray(raw["label"])[idx] + 2) % 10)
    assert fds.partitioners["train"].clusters == [0, 1, 2, 3, 0, 1, 2, 3]


def test_partitioners_on_any_hf_image_dataset():
    from datasets import Dataset

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)) for _ in range(30)]
    ds = Dataset.from_dict({"pixels": imgs, "target": list(range(30))})
    rp = RotationPartitioner(6, 3, angles=[0, 90, 270], image_column="pixels", seed=3)
    rp.dataset = ds
    seen = []
    for k in range(6):
        part = rp.load_partition(k)
        idx = rp.partition_indices(k)
        seen.extend(idx)
        for j, i in enumerate(idx):
            exp = np.rot90(np.asarray(imgs[i]), k=[0, 1, 3][k % 3], axes=(0, 1))
            assert np.array_equal(np.asarray(part[j]["pixels"]), exp)
    assert sorted(seen) == list(range(30))
    lp = LabelModClusterPartitioner(6, 3, partition_by="target", seed=0)
    lp.dataset = ds
    for k in range(6):
        assert all(t % 3 == k % 3 for t in lp.load_partition(k)["target"])
    # non-right angle: PIL rotation, same size
    rt = RotateTransform(45, "pixels")({"pixels": imgs[:2]})
    assert rt["pixels"][0].size == imgs[0].size
    iid = ClusterIidPartitioner(4, 2, seed=0)
    iid.dataset = ds
    assert sorted(np.concatenate(iid.all_indices()).tolist()) == list(range(30))


_DET = """
import json, sys
from floral_flwr.tasks import get_task
t = get_task("cifar100-reduced", num_clients=10, seed=7, data_dir=sys.argv[1])
print(json.dumps([t.partition_indices(k).tolist() for k in range(10)]
                 + [t.partition_indices(k, "test").tolist() for k in range(10)]))
"""


def test_same_seed_same_image_partition_in_another_process(data_root):
    r = subprocess.run([sys.executable, "-c", _DET, str(data_root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    other = json.loads(r.stdout.strip().splitlines()[-1])
    t = get_task("cifar100-reduced", num_clients=10, seed=7, data_dir=str(data_root))
    here = ([t.partition_indices(k).tolist() for k in range(10)]
            + [t.partition_indices(k, "test").tolist() for k in range(10)])
    assert here == other


def test_data_path_deployment(tmp_path, data_root):
    node = tmp_path / "node"
    spec = DATASETS["mnist"]
    x, y = _raw(data_root / "mnist" / "train.parquet", spec)
    write_parquet_split(node / "train.parquet", spec, x[:50], y[:50])
    t = get_task("mnist-rotate", num_clients=300, seed=0, data_path=str(node))
    assert t.num_clusters is None and t.cluster_of(17) is None
    d = t.client_data(17)
    assert d.num_train + d.num_test == 50 and d.num_test == 10
    assert t.client_data(3) is d  # the node's own data whatever the id
    tc = get_task("mnist-rotate", num_clients=300, seed=0, data_path=str(node), cluster=2)
    assert tc.cluster_of(5) == 2 and tc.num_clusters == 4
    dc = tc.client_data(5)
    assert torch.equal(dc.train_x, torch.flip(d.train_x, dims=(-2, -1)))  # 180 degrees
    write_parquet_split(node / "test.parquet", spec, x[50:70], y[50:70])
    t2 = get_task("mnist-label-shift-reduced", num_clients=4, seed=0, data_path=str(node))
    d2 = t2.client_data(0)
    assert d2.num_test == 20 and d2.num_train == 10


def _bad_parquet(path, spec, *, labels=None, blobs=None):
    n = len(labels) if labels is not None else len(blobs)
    if blobs is None:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((spec.height, spec.width), np.uint8)).save(buf, "PNG")
        blobs = [buf.getvalue()] * n
    if labels is None:
        labels = [0] * n
    img = pa.array([{"bytes": b, "path": None} for b in blobs],
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    tbl = pa.table({spec.image_column: img, spec.label_column: pa.array(labels, pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, path)


def _expect(call, *words, exc=ValueError):
    with pytest.raises(exc) as ei:
        call()
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))
    return ei.value


def test_bad_data_raise_clear_errors(tmp_path, data_root):
    spec = DATASETS["mnist"]
    # offline, no local copy: one clear error naming dataset, places, and the helper
    e = _expect(lambda: get_task("mnist-rotate", num_clients=10), "'mnist'", "ylecun/mnist",
                str(tmp_path / "empty-cache"), "python -m floral_flwr.data download mnist",
                "data-dir", exc=DatasetNotFoundError)
    assert isinstance(e, ValueError) and isinstance(e, FileNotFoundError)
    _expect(lambda: get_task("cifar10-rotate", data_dir=str(tmp_path / "nowhere")),
            "'cifar10'", str(tmp_path / "nowhere"))
    # wrong schema: a MNIST copy given as CIFAR-10
    (tmp_path / "wrong").mkdir()
    for s in ("train", "test"):
        (tmp_path / "wrong" / f"{s}.parquet").write_bytes(
            (data_root / "mnist" / f"{s}.parquet").read_bytes())
    _expect(lambda: get_task("cifar10-rotate", num_clients=4, data_dir=str(tmp_path / "wrong")),
            "wrong schema", "'img'", "train.parquet")
    # missing labels
    d = tmp_path / "nolabels"
    _bad_parquet(d / "train.parquet", spec, labels=[1, None, 3, 4])
    _bad_parquet(d / "test.parquet", spec, labels=[1, 2])
    _expect(lambda: get_task("mnist-rotate", num_clients=2, num_clusters=2, data_dir=str(d)),
            "missing labels", "row 1", "'label'")
    # labels out of range
    d = tmp_path / "badlabels"
    _bad_parquet(d / "train.parquet", spec, labels=[1, 12])
    _bad_parquet(d / "test.parquet", spec, labels=[1, 2])
    _expect(lambda: get_task("mnist-rotate", num_clients=1, num_clusters=1, data_dir=str(d)),
            "outside 0..9", "row 1")
    # unreadable image
    d = tmp_path / "garbage"
    _bad_parquet(d / "train.parquet", spec, blobs=[b"\x89PNG not really", b"xx"])
    _bad_parquet(d / "test.parquet", spec, labels=[1, 2])
    _expect(lambda: get_task("mnist-rotate", num_clients=1, num_clusters=1, data_dir=str(d)),
            "unreadable image", "row 0")
    # wrong image size
    d = tmp_path / "size"
    write_parquet_split(d / "train.parquet", spec, np.zeros((3, 32, 32), np.uint8), [0, 1, 2])
    write_parquet_split(d / "test.parquet", spec, np.zeros((3, 28, 28), np.uint8), [0, 1, 2])
    _expect(lambda: get_task("mnist-rotate", num_clients=1, num_clusters=1, data_dir=str(d)),
            "shape (32, 32)", "(28, 28)")
    # more clients than samples (test split has 60 rows)
    _expect(lambda: get_task("mnist-rotate", num_clients=100, data_dir=str(data_root)),
            "num_clients", "100 clients", "60 rows")
    # C larger than the number of clients / rotation list length
    _expect(lambda: get_task("mnist-rotate", num_clients=3, data_dir=str(data_root)),
            "num_clusters", "C=4")
    _expect(lambda: get_task("cifar10-rotate", num_clients=8, data_dir=str(data_root),
                             angles=[0, 90, 180]), "angles", "3 entries", "num_clusters is 4")
    _expect(lambda: get_task("cifar100", num_clients=20, data_dir=str(data_root), num_clusters=21),
            "num_clusters")
    _expect(lambda: get_task("mnist-rotate", num_clients=8, data_dir=str(data_root),
                             colour=1), "colour", "allowed options")
    _expect(lambda: get_task("mnist-rotate", num_clients=8, data_dir=str(data_root)).client_data(8),
            "cid", "0..7")
    _expect(lambda: get_task("mnist-rotate", data_path=str(tmp_path / "nonode")),
            "data_path", "train.parquet", exc=DatasetNotFoundError)
    _expect(lambda: RotationPartitioner(4, 4, angles=[0, 90]), "angles")
    _expect(lambda: LabelShiftPartitioner(2, 3), "num_clusters")


def test_data_cli_fake_and_check(tmp_path, capsys, monkeypatch):
    import floral_flwr.data as cli
    from floral_flwr.data import main

    def offline(name, out_dir):  # the real one needs the hub; here: what offline looks like
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(cli, "download_dataset", offline)

    assert main(["fake", "cifar100", str(tmp_path / "c"), "--train", "20", "--test", "10"]) == 0
    assert main(["check", "cifar100", str(tmp_path / "c")]) == 0
    assert "20 rows" in capsys.readouterr().out
    assert main(["check", "mnist", str(tmp_path / "c")]) == 1
    assert "wrong schema" in capsys.readouterr().err
    assert main(["download", "mnist", str(tmp_path / "d")]) == 1  # offline: one clear line
    assert "ylecun/mnist" in capsys.readouterr().err


def test_download_is_opt_in_and_failure_is_one_clear_error(monkeypatch, tmp_path):
    import floral_flwr.tasks.sources as src

    calls = []

    def fake_download(name, out_dir):
        calls.append((name, str(out_dir)))
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(src, "download_dataset", fake_download)
    _expect(lambda: get_task("cifar10-label-shift", num_clients=4), "'cifar10'",
            exc=DatasetNotFoundError)
    assert calls == []  # never downloads by default
    _expect(lambda: get_task("cifar10-label-shift", num_clients=4, download=True),
            "hub download failed", "no route", "uoft-cs/cifar10", exc=DatasetNotFoundError)
    assert calls == [("cifar10", str(tmp_path / "empty-cache" / "cifar10"))]

    def fake_ok(name, out_dir):  # "online": the helper writes the hub layout
        write_fake_dataset(name, out_dir, 40, 12, seed=0)
        return out_dir

    monkeypatch.setattr(src, "download_dataset", fake_ok)
    monkeypatch.setenv("FLORAL_FLWR_DOWNLOAD", "1")
    t = get_task("cifar10-label-shift", num_clients=4, data_dir=str(tmp_path / "dl"))
    assert t.source_dir == tmp_path / "dl" / "cifar10" and t.client_data(0).num_train == 10


def test_cifar_augment_is_flip_plus_padded_crop():
    from floral_flwr.tasks.images import make_augment

    spec = DATASETS["cifar10"]
    x = torch.randn(8, 3, 32, 32)
    out = make_augment(spec)(x, torch.Generator().manual_seed(1))
    fill = (-torch.tensor(spec.mean) / torch.tensor(spec.std)).view(3, 1, 1)
    for i in range(8):
        windows = []
        for src in (x[i], x[i].flip(-1)):
            p = fill.expand(3, 40, 40).clone()
            p[:, 4:36, 4:36] = src
            windows += [p[:, oy:oy + 32, ox:ox + 32] for oy in range(9) for ox in range(9)]
        assert any(torch.equal(w, out[i]) for w in windows)
    # rotate task, cluster rotated by 90 degrees: the flip is vertical in the rotated frame
    aug = make_augment(spec, (0.0, 90.0, 180.0, 270.0))
    out = aug(x, torch.Generator().manual_seed(1), cluster=1)
    for i in range(8):
        windows = []
        for src in (x[i], x[i].flip(-2)):
            p = fill.expand(3, 40, 40).clone()
            p[:, 4:36, 4:36] = src
            windows += [p[:, oy:oy + 32, ox:ox + 32] for oy in range(9) for ox in range(9)]
        assert any(torch.equal(w, out[i]) for w in windows)
