"""Client side: the ClientApp factory, local training/evaluation loops, private-state store."""

from floral_flwr.client.app import make_client_app

__all__ = ["make_client_app"]
