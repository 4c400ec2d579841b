"""``nora serve``: many unmerged NoRA/LoRA adapters on one base model behind an OpenAI-compatible API.

``config`` (one frozen ``ServeConfig``), ``protocol`` (request / response schemas, the error shape), ``guard`` (roles,
limits, read deadlines, connections), ``admission`` (request checks before the engine), ``serving`` (one request from
queue to answer), ``app`` (``create_app`` and the routes), ``engine`` (the façade the app talks to), ``pool`` (adapter
names -> slots, LRU, load/unload, validation through ``nora_peft.checkpoint``), ``layers`` (stacked adapter slots),
``scheduler`` (continuous batching), ``metrics``, ``cli`` (the command). See docs/serving.md.
"""

from .app import create_app
from .config import ServeConfig
from .engine import Engine, GenRequest, MultiAdapterLinear
from .errors import AdapterError
from .pool import AdapterPool

__all__ = ["AdapterError", "AdapterPool", "Engine", "GenRequest", "MultiAdapterLinear", "ServeConfig", "create_app"]
