"""Flower ClientApp entry point (``[tool.flwr.app.components] clientapp``).

All logic lives in :mod:`floral_flwr.client`; this module only exposes ``app``.
"""

from floral_flwr.client import make_client_app

app = make_client_app()
