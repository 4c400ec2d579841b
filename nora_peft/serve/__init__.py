"""``nora serve``: many unmerged NoRA/LoRA adapters on one base model behind an OpenAI-compatible API.

``app`` (routes, roles, limits, admission, errors), ``engine`` (the façade the app talks to), ``pool`` (adapter
names -> slots, LRU, load/unload, validation through ``nora_peft.checkpoint``), ``layers`` (stacked adapter slots),
``scheduler`` (continuous batching), ``metrics``, ``cli`` (the command). See docs/serving.md.
"""

from .app import Limits, create_app
from .engine import Engine, GenRequest, MultiAdapterLinear
from .errors import AdapterError
from .pool import AdapterPool

__all__ = ["AdapterError", "AdapterPool", "Engine", "GenRequest", "Limits", "MultiAdapterLinear", "create_app"]
