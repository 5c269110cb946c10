"""FLoRAL core: mixtures of low-rank adaptors folded into the weights (pure PyTorch, no flwr)."""
from .adaptors import CONV_METHODS, split_kernel
from .mixture import Mixture
from .model import Floral, ParameterReport, is_adaptor_key
from .rank import resolve_rank

__all__ = ["Floral", "ParameterReport", "is_adaptor_key", "Mixture", "resolve_rank",
           "split_kernel", "CONV_METHODS"]
