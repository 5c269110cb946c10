"""Flower ClientApp entry point (``[tool.flwr.app.components] clientapp``).

All logic lives in :mod:`floral_flwr.client`; this module only exposes ``app`` and ``warm_up``.
"""

from floral_flwr.client import make_client_app, warm_up

app = make_client_app()

__all__ = ["app", "warm_up"]
