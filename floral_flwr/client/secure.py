"""Client side of ``aggregation = 'secagg'``: Flower's ``secaggplus_mod`` around our handlers.

:func:`make_secure_mod` returns the train mod of the ClientApp. A train message that carries
SecAgg+ stage configs goes through Flower's ``secaggplus_mod``, which runs the key agreement,
secret sharing and masking itself and calls :func:`handle_secure` only in its
'collect masked vectors' stage. That handler reads the request in the legacy ``fitins.*`` layout
the workflow sends, does the work and answers in the ``fitres.*`` layout the mod reads:

- ``floral-purpose = 'train'``: one local round (:func:`floral_flwr.client.handlers.train_once`);
  the vector is :func:`floral_flwr.strategy.masked_sum.encode_train` of it (weighted deltas and
  the weights n_k, n_k p_k(c));
- ``floral-purpose = 'tally'``: this client's row of the contingency table
  one-hot(true cluster) x one-hot(assigned adaptor) of its last evaluation, for the cluster ARI.

In both, ``fitres.parameters`` (the vector) is replaced by its masked form by the mod; what
stays in plaintext is ``fitres.metrics``: the client id, n_k and the train loss (train) or
whether a row was added (tally), and ``fitres.num_examples = 1`` (every client weighs 1 in
Flower's mean; our weights are inside the vector). A vector with an entry outside
``[-secagg-clip, secagg-clip]`` is not sent at all: the handler raises, and the server treats the
client as dropped (SecAgg+ removes its masks).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.client.mod import secaggplus_mod
from flwr.compat.common import recorddict_compat as compat

from floral_flwr.client.handlers import EVAL_KEY, client_identity, train_once
from floral_flwr.config import parse_run_config
from floral_flwr.methods.training import seed_for
from floral_flwr.strategy.masked_sum import (
    ADAPTORS_KEY,
    CLUSTERS_KEY,
    KEYS_KEY,
    PURPOSE_KEY,
    SCALE_KEY,
    check_clip,
    check_flower_version,
    encode_tally,
    encode_train,
)
from floral_flwr.wire import from_array

FITINS_PARAMETERS, FITINS_CONFIG = "fitins.parameters", "fitins.config"
DROP_KEY = "secagg-drop-at"  # TEST-ONLY node config: fail at this SecAgg+ stage (a dropout)


def make_secure_mod(run_config_of: Callable[[Context], Mapping[str, Any]]) -> Callable[..., Message]:
    """The ClientApp's train mod: SecAgg+ stage messages through Flower's ``secaggplus_mod``,
    plain train requests to the next handler (which refuses them under 'secagg')."""

    def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        check_flower_version()
        drop_at = context.node_config.get(DROP_KEY)
        if drop_at and msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == drop_at:
            # TEST ONLY (floral_flwr/client/faults.py): this node drops out at that stage
            raise RuntimeError(f"node config '{DROP_KEY}' = {drop_at!r}: dropping out of secure aggregation")
        run_config = run_config_of(context)
        return secaggplus_mod(msg, context, lambda m, c: handle_secure(m, c, run_config))

    return secure_mod


def _received_state(msg: Message) -> ArrayRecord:
    """The global state of a ``fitins`` request, under its real keys (the legacy layout numbers
    the tensors; the workflow's config lists the keys in the same order)."""
    config = msg.content.config_records[FITINS_CONFIG]
    keys = [k for k in str(config.get(KEYS_KEY, "")).split("\n") if k]
    record = msg.content.array_records[FITINS_PARAMETERS]
    tensors = [a for k, a in record.items() if k != compat.EMPTY_TENSOR_KEY]
    if len(tensors) != len(keys):
        raise ValueError(f"secure train request: {len(tensors)} tensors but {len(keys)} keys")
    return ArrayRecord(dict(zip(keys, tensors)))


def _reply(msg: Message, vector: np.ndarray, metrics: dict[str, Any]) -> Message:
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), num_examples=1, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _clip_range(context: Context) -> float:
    """The clipping range the mod will quantize with (its own state, from the setup stage)."""
    return float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])


def secure_train(msg: Message, context: Context, run_config: Mapping[str, Any]) -> tuple[np.ndarray, dict]:
    """One local round; the weighted deltas and weights to be masked, and the plaintext metrics."""
    config = msg.content.config_records[FITINS_CONFIG]
    received = _received_state(msg)
    local = train_once(context, config, received, run_config)
    handle = local.setup.handle
    vector = encode_train(
        {k: from_array(a) for k, a in received.items()},
        {k: from_array(a) for k, a in local.arrays.items()},
        local.num_examples,
        local.adaptor_weights,
        handle.num_adaptors,
        float(config[SCALE_KEY]),
    )
    plain = {"client-id": local.client_id, "num-examples": local.num_examples, "train-loss": local.loss}
    return vector, plain


def secure_tally(msg: Message, context: Context) -> tuple[np.ndarray, dict]:
    """This client's row of the (true cluster x assigned adaptor) table of its last evaluation."""
    config = msg.content.config_records[FITINS_CONFIG]
    rnd = int(config["server-round"])
    k, c = int(config[CLUSTERS_KEY]), int(config[ADAPTORS_KEY])
    cid, _ = client_identity(context)
    last = context.state.config_records.get(EVAL_KEY)
    counted = last is not None and int(last["round"]) == rnd
    if counted:
        vector = encode_tally(int(last["true-cluster"]), int(last["assigned"]), k, c)
    else:  # no evaluation of this round here: take part, add nothing
        vector = np.zeros(k * c, dtype=np.float64)
    return vector, {"client-id": cid, "tallied": int(counted)}


def handle_secure(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """The 'collect masked vectors' stage: the vector to mask (in ``fitres.parameters``)."""
    config = msg.content.config_records[FITINS_CONFIG]
    purpose = str(config.get(PURPOSE_KEY, ""))
    if purpose == "train":
        vector, plain = secure_train(msg, context, run_config)
    elif purpose == "tally":
        vector, plain = secure_tally(msg, context)
    else:
        raise ValueError(f"secure request '{PURPOSE_KEY}' = {purpose!r}: allowed 'train', 'tally'")
    check_clip(vector, _clip_range(context))
    # Flower's mod rounds stochastically with numpy's global generator right after this returns:
    # seeding it per (run seed, round, client) makes secure runs reproducible (a resumed run
    # equals the uninterrupted one). The rounding noise protects nothing; the masks come from
    # the key agreement and os.urandom.
    cfg = parse_run_config(run_config)
    cid, _ = client_identity(context)
    np.random.seed(seed_for(cfg.seed, int(config["server-round"]), cid) % (1 << 32))
    return _reply(msg, vector, plain)
