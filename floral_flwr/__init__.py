"""floral-flwr: FLoRAL (Federated Low-Rank Adaptive Learning) as a Flower application.

``from floral_flwr import Floral`` gives the pure-PyTorch parameterization; the Flower glue lives
in ``floral_flwr.strategy`` (server) and ``floral_flwr.client`` (client).

The core is imported on first use (PEP 562 ``__getattr__``), not with the package: front ends
such as ``python -m floral_flwr.launch`` validate a run config before anything starts, and
importing torch first would cost them seconds.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from floral_flwr.floral import Floral, ParameterReport, is_adaptor_key

__all__ = ["Floral", "ParameterReport", "is_adaptor_key"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from floral_flwr import floral

        return getattr(floral, name)
    raise AttributeError(f"module 'floral_flwr' has no attribute {name!r}")
