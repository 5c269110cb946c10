"""Task suite of floral-flwr (contracts.md §3): data partitions, models, loss/metric, true clusters
and the paper's presets. Plain PyTorch + numpy + scikit-learn + flwr-datasets; no ``flwr``.

```python
from floral_flwr.tasks import get_task, TASK_NAMES
task = get_task("digits-label-shift", num_clients=20, seed=0)
data = task.client_data(3)          # ClientData(train_x, train_y, test_x, test_y)
model = task.build_model()
```

Tasks (``TASK_NAMES``):

* ``synthetic-linear``, ``synthetic-mlp`` (+ ``-simple``, ``-bn``): the paper's generator
  (``floral_flwr.tasks.synthetic``), regression, metric ``"mse"``.
* ``digits-rotate``, ``digits-label-shift``: scikit-learn digits, offline (``.digits``); each
  also ``-reduced`` (the scarce-data rule below, same test splits).
* ``mnist-rotate``, ``mnist-label-shift``, ``fmnist-rotate``, ``fmnist-label-shift``
  (Fashion-MNIST under the paper's MNIST protocol), ``cifar10-rotate``, ``cifar10-label-shift``,
  ``cifar100`` (+ ``cifar100-bn``, ``cifar100-gn`` VGG-8 norm variants), each also ``-reduced``
  (5 % of each client's training data, seeded, min 10): Hugging Face image datasets from local
  parquet files (``data_dir``) or the hub (``.images``; data layout documented there). Offline,
  ``python -m floral_flwr.data prepare fashion-mnist|mnist-5k <dir>`` writes them (``.prepare``);
  on the 5,000-digit MNIST subset the ``mnist-*`` preset has 20 clients.
* ``wordnet-label-shift``, ``wordnet-concept-shift`` (+ ``-reduced``): WordNet noun definitions
  -> supersense on the pretrained MiniLM (``.text``; data ``.wordnet``, model ``.text_model``;
  needs the ``[text]`` extra and Debian ``wordnet-base``; ``python -m floral_flwr.data prepare
  wordnet <dir>`` writes the data).

``get_task(name, num_clients=20, seed=0, data_dir=None, data_path=None, **options)``:
``num_clients=None`` means the paper's K (``task.defaults["num-clients"]``). Options may be given
with run-config spelling (``num-clusters``) or python spelling (``num_clusters``); unknown
options, tasks or out-of-range values raise ``ValueError`` naming the key and allowed values.
Tasks are cached per process by (name, num_clients, seed, data_dir, data_path, options), LRU
of 8; decoded datasets are cached per file; ``client_data(cid)`` is cached per task (LRU bounded
by ``Task.cache_bytes``, 1 GiB) and costs O(client size) the first time.

True clusters: client k is in cluster ``k mod C`` for every clustered task (the official code's
rule); ``task.clusters`` lists them. ``task_defaults(name, data_dir=None)`` gives the preset
without loading data (for an image task it reads the data directory's manifest, if any: a
prepared subset such as ``mnist-5k`` has its own number of clients).

Beyond contracts.md §3 each task also has: ``defaults["adapt-norm"]`` (True for the -bn/-gn
variants), ``extra_defaults`` (paper server optimizer / lr, e.g. FedAdam 0.001 for CIFAR-100),
``augment`` (CIFAR only: batch flip + padded crop, ``augment(x, generator)``), ``clusters``,
``options`` and ``seed``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .base import RUN_CONFIG_KEYS, ClientData, Task
from .digits import DIGITS_NAMES
from .synthetic import SYNTHETIC_NAMES
from .text import TEXT_NAMES

_IMAGE_BASE = ("mnist-rotate", "mnist-label-shift", "fmnist-rotate", "fmnist-label-shift",
               "cifar10-rotate", "cifar10-label-shift", "cifar100", "cifar100-bn", "cifar100-gn")
IMAGE_NAMES = tuple(n for b in _IMAGE_BASE for n in (b, b + "-reduced"))

TASK_NAMES: tuple[str, ...] = SYNTHETIC_NAMES + DIGITS_NAMES + IMAGE_NAMES + TEXT_NAMES

__all__ = ["task_info", "TaskInfo", "get_task", "task_defaults", "task_server_presets", "TASK_NAMES", "Task", "ClientData", "RUN_CONFIG_KEYS",
           "clear_cache"]

_TASKS: "OrderedDict[tuple, Task]" = OrderedDict()
_MAX_TASKS = 8  # LRU bound: each task may hold up to Task.cache_bytes of client tensors
_LOCK = threading.RLock()


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def get_task(name: str, num_clients: Optional[int] = 20, seed: int = 0,
             data_dir: Optional[str] = None, data_path: Optional[str] = None,
             **options: Any) -> Task:
    """Build (or fetch from the per-process cache) the task ``name``; see the module docstring."""
    if not isinstance(name, str) or name not in TASK_NAMES:
        raise ValueError(f"task: unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    norm_opts = {k.replace("-", "_"): v for k, v in options.items()}
    key = (name, num_clients, seed, data_dir, data_path, _freeze(norm_opts))
    with _LOCK:
        return _get_task(name, num_clients, seed, data_dir, data_path, norm_opts, key)


def _get_task(name, num_clients, seed, data_dir, data_path, norm_opts, key) -> Task:
    try:
        hit = _TASKS.get(key)
    except TypeError:  # unhashable option value: build without caching
        hit, key = None, None
    if hit is not None:
        _TASKS.move_to_end(key)
        return hit
    if name in SYNTHETIC_NAMES or name in DIGITS_NAMES:
        if data_dir is not None or data_path is not None:
            # data_dir may come from a shared run config: harmless for embedded datasets
            if data_path is not None:
                raise ValueError(f"data_path: task {name!r} has no files to read; data_path is "
                                 f"only supported for: {', '.join(IMAGE_NAMES)}")
        if name in SYNTHETIC_NAMES:
            from .synthetic import SyntheticTask

            task: Task = SyntheticTask(name, num_clients, seed, **norm_opts)
        else:
            from .digits import DigitsTask

            task = DigitsTask(name, num_clients, seed, **norm_opts)
    elif name in TEXT_NAMES:
        from .text import TextTask

        task = TextTask(name, num_clients, seed, data_dir=data_dir, data_path=data_path, **norm_opts)
    else:
        from .images import ImageTask

        task = ImageTask(name, num_clients, seed, data_dir=data_dir, data_path=data_path,
                         **norm_opts)
    if key is not None:
        _TASKS[key] = task
        if num_clients is None:  # the preset's K: the same task as asking for that K explicitly
            # (the server's preset lookup builds it with None, the clients then ask for K)
            _TASKS[(name, task.num_clients, *key[2:])] = task
        while len(_TASKS) > _MAX_TASKS:
            _TASKS.popitem(last=False)
    return task


@dataclass(frozen=True)
class TaskInfo:
    """What the server needs to know about a task, without any client data."""

    name: str
    metric: str
    num_clusters: Optional[int]
    build_model: Callable[[], Any]
    defaults: dict


def task_info(name: str, seed: int = 0, **options: Any) -> TaskInfo:
    """Metric, true number of clusters, model factory and preset of ``name``.

    The server uses this instead of ``get_task``: in deployment it has no client data, and
    in simulation there is no reason to decode MNIST/CIFAR on the server just to build a model.
    """
    if not isinstance(name, str) or name not in TASK_NAMES:
        raise ValueError(f"task: unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    if name in IMAGE_NAMES:
        from .images import PAPER_PRESETS, dataset_of, image_defaults, model_for

        dataset = dataset_of(name)
        c = options.get("num_clusters", options.get("num-clusters", PAPER_PRESETS[dataset][1]))
        return TaskInfo(name, "accuracy", int(c), lambda: model_for(name), image_defaults(name, c))
    if name in TEXT_NAMES:  # no WordNet on the server: the model and the preset only
        from .text import OPTION_DEFAULTS, text_defaults, text_model_factory

        c = int(options.get("num_clusters", options.get("num-clusters", OPTION_DEFAULTS["num_clusters"])))
        return TaskInfo(name, "accuracy", c, text_model_factory(name, **options), text_defaults(name, **options))
    task = get_task(name, num_clients=None, seed=seed, **options)  # embedded: cheap to build
    return TaskInfo(name, task.metric, task.num_clusters, task.build_model, dict(task.defaults))


def task_defaults(name: str, data_dir: Optional[str] = None, **options: Any) -> dict:
    """``get_task(name, num_clients=None, data_dir=data_dir, **options).defaults`` without
    loading any data (the image tasks' presets come from a table, plus the prepared variant the
    manifest in ``data_dir`` names, if any; the embedded tasks are cheap to build)."""
    if not isinstance(name, str) or name not in TASK_NAMES:
        raise ValueError(f"task: unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    if name in IMAGE_NAMES:
        from .images import data_variant, image_defaults

        c = options.get("num_clusters", options.get("num-clusters"))
        return image_defaults(name, c, data_variant(name, data_dir or None))
    if name in TEXT_NAMES:
        from .text import text_defaults

        return text_defaults(name, **options)
    return dict(get_task(name, num_clients=None, **options).defaults)


def task_server_presets(name: str) -> dict:
    """The paper's server optimizer and lr of task ``name`` (from its ``extra_defaults``; no
    data loaded): what the run-config keys ``server-optimizer`` / ``server-lr`` = "auto"
    resolve to (CIFAR-100: FedAdam, 0.001)."""
    if not isinstance(name, str) or name not in TASK_NAMES:
        raise ValueError(f"task: unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    if name in IMAGE_NAMES:
        from .images import image_extra_defaults

        extra = image_extra_defaults(name)
    else:  # no task is built: a text task would read its data, which the server need not have
        from .base import fedavg_server_preset

        extra = fedavg_server_preset()
    return {k: extra[k] for k in ("server-optimizer", "server-lr") if k in extra}


def clear_cache() -> None:
    """Drop cached tasks and decoded datasets (tests, benchmarks)."""
    _TASKS.clear()
    from . import digits

    digits._DIGITS.clear()
    from . import text_model, wordnet

    text_model.clear_cache()
    wordnet.clear_cache()
    try:
        from . import images

        images.clear_cache()
    except ImportError:  # pragma: no cover
        pass


def partition_sizes(name: str, num_clients: int, seed: int = 0) -> Optional[list[int]]:
    """Every client's train size, computed from the task itself, or None when the server cannot
    know it (image and text tasks: their data are on the clients, a prepared ``data-dir`` the
    server need not have). The server bounds each reply's weight with it
    (:mod:`floral_flwr.strategy.bounds`) instead of trusting the client's count."""
    if name in IMAGE_NAMES or name in TEXT_NAMES or name not in TASK_NAMES:
        return None
    task = get_task(name, num_clients=num_clients, seed=seed)  # embedded: the clients' own split
    return [task.client_data(cid).num_train for cid in range(num_clients)]
