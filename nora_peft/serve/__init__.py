"""``nora serve``: many unmerged NoRA/LoRA adapters on one base model behind an OpenAI-compatible API.

``engine`` (adapter pool + batching loop over the gathered pass of ``nora_peft.mixed``), ``app`` (FastAPI routes),
``adapters`` (reading peft adapter folders), ``cli`` (the command). See docs/serving.md.
"""

from .adapters import read_adapter
from .app import create_app
from .engine import Engine, GenRequest, MultiAdapterLinear
from .errors import AdapterError

__all__ = ["AdapterError", "Engine", "GenRequest", "MultiAdapterLinear", "create_app", "read_adapter"]
