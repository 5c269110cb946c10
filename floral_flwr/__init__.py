"""floral-flwr: FLoRAL (Federated Low-Rank Adaptive Learning) as a Flower application.

``from floral_flwr import Floral`` gives the pure-PyTorch parameterization; the Flower glue lives
in ``floral_flwr.strategy`` (server) and ``floral_flwr.client`` (client).
"""

from floral_flwr.floral import Floral, ParameterReport, is_adaptor_key

__all__ = ["Floral", "ParameterReport", "is_adaptor_key"]
__version__ = "0.1.0"
