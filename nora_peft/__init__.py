"""nora-peft: NoRA (Non-linear Rank Adaptation) as a PEFT method, and the harness that tests its claims.

``import nora_peft`` registers the ``"NORA"`` peft type, after which peft's own API works with NoRA::

    from peft import get_peft_model, PeftModel
    from nora_peft import NoraConfig
    model = get_peft_model(base, NoraConfig(r=64, alpha=128, dropout=0.1, target_modules=["q_proj", "v_proj"]))

Tools that load adapters themselves (lm-eval, transformers' pipeline) need that import too: use ``nora lm-eval`` or
the opt-in ``python -m nora_peft.autoregister enable`` (docs/ecosystem.md).
"""

from .tuner.config import NORA_PEFT_TYPE, NoraConfig, NoraPeftType
from .tuner.layer import Linear, NoraLayer, ParallelBlock
from .tuner.model import NoraModel
from .tuner.ops import nora_delta, nora_delta_reference
from .tuner.registry import register

register()

__version__ = "0.1.0"
__all__ = [
    "NORA_PEFT_TYPE",
    "Linear",
    "NoraConfig",
    "NoraLayer",
    "NoraModel",
    "NoraPeftType",
    "ParallelBlock",
    "nora_delta",
    "nora_delta_reference",
    "register",
]
