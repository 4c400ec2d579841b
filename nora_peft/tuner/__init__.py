"""NoRA as a peft tuner, in peft's ``tuners/<method>/`` shape: ``config`` (NoraConfig), ``layer`` (the NoRA layers),
``model`` (NoraModel), ``registry`` (the one shim that registers the ``"NORA"`` peft type) and ``ops`` (Eq. 2's
public names; the branch itself is computed in ``nora_peft.kernels``)."""

from .config import NORA_PEFT_TYPE, NoraConfig, NoraPeftType
from .layer import Linear, NoraLayer, ParallelBlock
from .model import NoraModel
from .registry import register

__all__ = [
    "NORA_PEFT_TYPE",
    "Linear",
    "NoraConfig",
    "NoraLayer",
    "NoraModel",
    "NoraPeftType",
    "ParallelBlock",
    "register",
]
