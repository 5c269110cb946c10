"""Server side: the FLoRAL aggregation rule and the Flower strategy built on it.

- :mod:`.floral_strategy`: ``FloralStrategy``, one server round (configure -> aggregate ->
  evaluate -> checkpoint), each step delegating to the modules below;
- :mod:`.aggregate`: the p(k|c) aggregation rule (streaming accumulator, numpy only);
- :mod:`.validation`: checks on client replies before anything reaches the aggregate;
- :mod:`.nodes`: waiting for nodes, node -> client-id discovery, deterministic sampling;
- :mod:`.replies`: train replies ordered, validated and folded in; failures reported;
- :mod:`.evaluation`: personalized evaluation rows and their summaries;
- :mod:`.round_stats`: the per-round bookkeeping the results recorder reads;
- :mod:`.optimizer_state`: server-optimizer moments for the checkpoint, and the dtype pin;
- :mod:`.optimizers`: composition with Flower's server optimizers, ``build_strategy``.
"""

from floral_flwr.strategy.aggregate import FloralAccumulator, aggregate_floral, is_adaptor_key
from floral_flwr.strategy.floral_strategy import FloralStrategy
from floral_flwr.strategy.optimizers import build_strategy, strategy_class

__all__ = [
    "FloralAccumulator",
    "FloralStrategy",
    "aggregate_floral",
    "build_strategy",
    "is_adaptor_key",
    "strategy_class",
]
