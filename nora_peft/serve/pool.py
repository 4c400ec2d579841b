"""The adapter pool: adapter names -> slots in every adapted layer, least recently used evicted (vLLM's LoRA manager).

The pool owns which linear layers of the base model are wrapped, which adapter sits in which slot, and the checks an
adapter passes before it gets one. The layer class that holds the stacked slots is given to it (``layer_factory``),
so the pool does not import the engine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .adapters import AdapterWeights, check_fits
from .errors import AdapterError


class AdapterPool:
    """Adapters held in memory: name -> slot in every adapted layer, least recently used evicted.

    Args:
        model: the base model; its own ``nn.Linear`` layers (recorded here, before any wrapping) are the only
            layers an adapter may target.
        capacity: how many adapters fit at once (slots); the layers get one more, all-zero slot for base rows.
        layer_factory: ``layer_factory(linear, pool)`` builds the module that replaces a targeted linear layer; it
            must offer ``set_slot(slot, up, down, scaling)``, ``grow_rank(r_max)`` and ``.base``.
        r_max: the initial padded rank of every slot.
    """

    def __init__(
        self, model: nn.Module, capacity: int, layer_factory: Callable[[nn.Linear, AdapterPool], Any], r_max: int = 8
    ) -> None:
        if capacity < 1:
            raise ValueError(f"max_adapters must be >= 1; got {capacity}.")
        self.model = model
        self.capacity = capacity
        self.layer_factory = layer_factory
        self.r_max = r_max
        #: ``{module: (out_features, in_features)}`` of the base model's own linear layers (never the wrappers)
        self.linear_shapes: dict[str, tuple[int, int]] = {
            name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
        }
        self.layers: dict[str, Any] = {}
        self.slots: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self.adapters: dict[str, AdapterWeights] = {}
        device = next(model.parameters()).device
        self.kind = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.kinds: tuple[str, ...] = ("identity",)
        self.index: torch.Tensor | None = None  # per-row slot indices of the current forward step
        self.loads = 0
        self.evictions = 0

    def check_fits(self, adapter: AdapterWeights) -> None:
        """Raise :class:`AdapterError` (400) unless every layer of ``adapter`` is a base linear layer it fits."""
        check_fits(adapter, self.linear_shapes)

    def slot_of(self, name: str) -> int | None:
        """``name``'s slot (marking it most recently used), or ``None`` when it is not in memory."""
        slot = self.slots.get(name)
        if slot is not None:
            self.slots.move_to_end(name)
        return slot

    def add(self, adapter: AdapterWeights, pinned: set[str] = frozenset()) -> int:  # type: ignore[assignment]
        """Put ``adapter`` into a slot (replacing one of the same name), evicting the LRU unpinned adapter if full."""
        self.check_fits(adapter)
        if adapter.name in self.slots:
            slot = self.slots[adapter.name]
        else:
            slot = self._free_slot(pinned)
        if adapter.max_rank > self.r_max:
            self.r_max = adapter.max_rank
            for layer in self.layers.values():
                layer.grow_rank(self.r_max)
        for module in adapter.modules:
            if module not in self.layers:
                self._wrap(module)
        if adapter.activation not in self.kinds:
            self.kinds = (*self.kinds, adapter.activation)
        self.kind[slot] = self.kinds.index(adapter.activation)
        for module, layer in self.layers.items():
            up, down, scaling = adapter.modules.get(module, (None, None, 0.0))
            layer.set_slot(slot, up, down, scaling)
        self.slots[adapter.name] = slot
        self.slots.move_to_end(adapter.name)
        self.adapters[adapter.name] = adapter
        self.loads += 1
        return slot

    def _free_slot(self, pinned: set[str]) -> int:
        used = set(self.slots.values())
        free = [s for s in range(self.capacity) if s not in used]
        if free:
            return free[0]
        victim = next((n for n in self.slots if n not in pinned), None)
        if victim is None:
            raise AdapterError(
                f"All {self.capacity} adapter slots are in use by the running batch; raise --max-adapters.", status=503
            )
        self.evictions += 1
        return self.remove(victim)

    def remove(self, name: str) -> int:
        """Free ``name``'s slot; returns the slot."""
        slot = self.slots.pop(name)
        self.adapters.pop(name, None)
        for layer in self.layers.values():
            layer.set_slot(slot, None, None, 0.0)
        return slot

    def _wrap(self, module: str) -> None:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = self.layer_factory(getattr(parent, child), self)
        for name, slot in self.slots.items():  # adapters loaded earlier that target this module
            up, down, scaling = self.adapters[name].modules.get(module, (None, None, 0.0))
            layer.set_slot(slot, up, down, scaling)
        setattr(parent, child, layer)
        self.layers[module] = layer
