"""The ClientApp: routes Flower messages to :mod:`floral_flwr.client.handlers`; train messages
of a secure exchange go through Flower's SecAgg+ mod first (:mod:`floral_flwr.client.secure`)."""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from floral_flwr.client import handlers
from floral_flwr.client.secure import make_secure_mod
from floral_flwr.wire import packed_arrays_mod


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` are merged over the run config (tests with ``run_simulation``,
    whose run config is empty)."""
    # the server packs each message's arrays into one wire object (floral_flwr.strategy.exchange)
    app = ClientApp(mods=[packed_arrays_mod])
    extra = dict(overrides or {})

    def _cfg(context: Context) -> dict[str, Any]:
        # Flower forbids changing context.run_config, so the merged config is passed along
        return {**dict(context.run_config), **extra}

    @app.train(mods=[make_secure_mod(_cfg)])
    def train(msg: Message, context: Context) -> Message:
        return handlers.handle_train(msg, context, _cfg(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handlers.handle_evaluate(msg, context, _cfg(context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handlers.handle_query(msg, context, _cfg(context))

    return app
