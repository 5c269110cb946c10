"""Server side: the FLoRAL aggregation rule and the Flower strategy built on it."""

from floral_flwr.strategy.aggregate import FloralAccumulator, aggregate_floral, is_adaptor_key
from floral_flwr.strategy.floral_strategy import FloralStrategy, build_strategy, strategy_class

__all__ = [
    "FloralAccumulator",
    "FloralStrategy",
    "aggregate_floral",
    "build_strategy",
    "is_adaptor_key",
    "strategy_class",
]
