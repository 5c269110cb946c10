"""Methods: what model a client trains, what is federated and what stays private.

One module per method, all peers, each registering itself (:func:`.base.register`) with its
:class:`.base.MethodSpec` and a docstring giving the definition, the source paper, what is
federated and what stays private:

=================== =========================================================================
module              methods
=================== =========================================================================
:mod:`.floral`        ``floral``, ``floral-oracle``
:mod:`.local_adaptor` ``local-adaptor``
:mod:`.fedavg`        ``fedavg``
:mod:`.fedavg_lora`   ``fedavg-lora``
:mod:`.fedavg_ft`     ``fedavg-ft``
:mod:`.ensemble`      ``ensemble``, ``ensemble-oracle``
:mod:`.ifca`          ``ifca``
:mod:`.fedem`         ``fedem``
:mod:`.ditto`         ``ditto``
:mod:`.feddpa`        ``feddpa``
=================== =========================================================================

Shared machinery: :mod:`.base` (the :class:`ModelHandle` interface and the registry),
:mod:`.training` (the local loops; imports no method), :mod:`.multimodel` (C full models as one
stacked shared state). Adding a method = one module here plus its import line below.
"""

from floral_flwr.methods.base import METHOD_SPECS, MethodSpec, ModelHandle, build_handle, check_method_task, register

# every method registers itself at import; this order is the order of METHOD_SPECS
from floral_flwr.methods import floral, local_adaptor, fedavg_lora, fedavg  # noqa: E402,F401
from floral_flwr.methods import fedavg_ft, ensemble, ifca, fedem, ditto, feddpa  # noqa: E402,F401
from floral_flwr.methods.floral import FloralHandle, floral_kwargs  # noqa: E402
from floral_flwr.methods.training import sgd_steps  # noqa: E402

__all__ = ["METHOD_SPECS", "MethodSpec", "ModelHandle", "FloralHandle", "build_handle", "check_method_task",
           "floral_kwargs", "register", "sgd_steps"]
