"""Flower ServerApp entry point (``[tool.flwr.app.components] serverapp``).

All logic lives in :mod:`floral_flwr.server`; this module only exposes ``app``.
"""

from floral_flwr.server import make_server_app

app = make_server_app()
