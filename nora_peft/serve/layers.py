"""Adapted linear layers for serving (vLLM's ``lora/layers``): a frozen base linear plus stacked adapter slots.

* :class:`SlotStacks` is shared by every adapted layer of one model. It decides where each pool slot lives: in the
  stack of its :func:`~..kernels.mixed.rank_bucket` (r <= 8 -> 8, r = 9..16 -> 16, ..., r = 256 -> 256), at a position
  of that bucket. A bucket's tensors hold exactly as many positions as it needs (the last one freed shrinks it, the
  last adapter leaving frees it), so one r=256 adapter never pads the r=8 ones and its memory goes when it goes.
* :class:`StepMapping` is the per-step batch mapping (vLLM's ``LoRAMapping`` / punica wrapper): each row's slot,
  grouped into :class:`~..kernels.mixed.Segment` s once per step on the host. The scheduler sets it for one forward
  with ``with stacks.use(mapping): model(...)``; every layer reads it from the shared ``SlotStacks``.
* :class:`MultiAdapterLinear` replaces a targeted ``nn.Linear``: ``base(x)``, then the step's segments added into it in
  place through the kernel seam (``kernels.select`` picks the backend once per layer: torch on CPU, Triton on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.activations import get as get_activation
from ..kernels.mixed import Segment, StackedAdapters, plan_segments, rank_bucket, segmented_add_, write_slot
from ..kernels.select import Backend, compute_dtype, select


@dataclass(frozen=True)
class StepMapping:
    """Which adapter slot each row of one forward step uses.

    Attributes:
        slots: the pool slot per row (``-1``: the base model, no adapter).
        segments: the rows grouped by rank bucket (rows on the base model are in none).
    """

    slots: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padded ranks this step pays for."""
        return tuple(int(s.key) for s in self.segments)


class SlotStacks:
    """The slot layout shared by the adapted layers of one model: pool slot -> (rank bucket, position).

    The pool calls :meth:`assign` before writing a slot's weights into the layers and :meth:`release` when the slot
    is freed; :meth:`wrap` builds the layer that replaces a base linear.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.layers: list[MultiAdapterLinear] = []
        self.where: dict[int, tuple[int, int]] = {}  # pool slot -> (bucket rank, position in the bucket)
        self.sizes: dict[int, int] = {}  # bucket rank -> positions allocated
        # per bucket: the activations present and each position's index into them (one kind -> no masking)
        self.kinds: dict[int, tuple[str, ...]] = {}
        self.kind: dict[int, torch.Tensor] = {}
        self.activation: dict[tuple[int, int], str] = {}  # (bucket, position) -> activation name
        self.version = 0  # bumped on every layout change; layers rebuild their stack views when it moves
        self.current: StepMapping | None = None

    # -- layout -------------------------------------------------------------------------------------------------
    def wrap(self, base: nn.Linear) -> MultiAdapterLinear:
        """The adapted layer that replaces ``base`` (with zero slots for the adapters already assigned)."""
        layer = MultiAdapterLinear(base, self)
        self.layers.append(layer)
        return layer

    def assign(self, slot: int, rank: int, activation: str) -> None:
        """Give pool ``slot`` a position in the bucket of ``rank`` (moving it if its bucket changes)."""
        get_activation(activation)  # validates the name
        bucket = rank_bucket(rank)
        if slot in self.where and self.where[slot][0] != bucket:
            self.release(slot)
        if slot not in self.where:
            used = {pos for b, pos in self.where.values() if b == bucket}
            pos = next((p for p in range(self.sizes.get(bucket, 0)) if p not in used), None)
            if pos is None:
                pos = self.sizes.get(bucket, 0)
                self._resize(bucket, pos + 1)
            self.where[slot] = (bucket, pos)
        bucket, pos = self.where[slot]
        self.activation[(bucket, pos)] = activation
        self._index_kinds(bucket)
        self.version += 1

    def release(self, slot: int) -> None:
        """Free ``slot``'s position; trailing free positions are dropped, an empty bucket is freed."""
        bucket, pos = self.where.pop(slot)
        self.activation.pop((bucket, pos), None)
        for layer in self.layers:
            layer.set_position(bucket, pos, None, None, 0.0)
        used = [p for b, p in self.where.values() if b == bucket]
        self._resize(bucket, max(used) + 1 if used else 0)
        self._index_kinds(bucket)
        self.version += 1

    def _index_kinds(self, bucket: int) -> None:
        if bucket not in self.sizes:
            self.kinds.pop(bucket, None)
            return
        acts = {pos: act for (b, pos), act in self.activation.items() if b == bucket}
        kinds = tuple(dict.fromkeys(acts.values())) or ("identity",)
        self.kinds[bucket] = kinds
        kind = [kinds.index(acts[p]) if p in acts else 0 for p in range(self.sizes[bucket])]
        self.kind[bucket] = torch.tensor(kind, dtype=torch.long, device=self.device)

    def _resize(self, bucket: int, n: int) -> None:
        if n == self.sizes.get(bucket, 0):
            return
        for layer in self.layers:
            layer.resize(bucket, n)
        if n:
            self.sizes[bucket] = n
        else:
            self.sizes.pop(bucket, None)
            self.kind.pop(bucket, None)

    @property
    def r_max(self) -> int:
        """The largest padded rank held (0 without adapters)."""
        return max(self.sizes, default=0)

    def nbytes(self) -> int:
        """Bytes of stacked adapter weights over all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    # -- the per-step mapping -----------------------------------------------------------------------------------
    def mapping(self, row_slots: Sequence[int]) -> StepMapping:
        """The mapping of a batch whose row ``b`` uses pool slot ``row_slots[b]`` (``-1``: base model)."""
        where = [self.where[s] if s >= 0 else None for s in row_slots]
        return StepMapping(tuple(row_slots), plan_segments(where, self.activation, self.device))

    @contextmanager
    def use(self, mapping: StepMapping | None) -> Iterator[None]:
        """Set ``mapping`` for the forward passes inside the block (``None``: every row on the base model)."""
        previous, self.current = self.current, mapping
        try:
            yield
        finally:
            self.current = previous


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus, per rank bucket, the stacked weights of the adapters in that bucket."""

    def __init__(self, base: nn.Linear, stacks: SlotStacks) -> None:
        super().__init__()
        self.base = base
        self.stacks = stacks
        self.up: dict[int, torch.Tensor] = {}  # bucket -> (positions, bucket, in_features)
        self.down: dict[int, torch.Tensor] = {}  # bucket -> (positions, bucket, out_features), scaling folded in
        self._views: tuple[int, dict[int, StackedAdapters]] = (-1, {})
        for bucket, n in stacks.sizes.items():
            self.resize(bucket, n)

    def resize(self, bucket: int, n: int) -> None:
        """Give ``bucket`` ``n`` positions (new ones zero, the first ``min(n, old)`` kept; 0 frees it)."""
        w = self.base.weight
        dtype = compute_dtype(w.device, w.dtype)  # float32 stacks for a half-precision base on CPU
        up = torch.zeros(n, bucket, self.base.in_features, dtype=dtype, device=w.device)
        down = torch.zeros(n, bucket, self.base.out_features, dtype=dtype, device=w.device)
        if bucket in self.up:
            keep = min(n, self.up[bucket].shape[0])
            up[:keep], down[:keep] = self.up[bucket][:keep], self.down[bucket][:keep]
        if n:
            self.up[bucket], self.down[bucket] = up, down
        else:
            self.up.pop(bucket, None)
            self.down.pop(bucket, None)

    def set_slot(self, slot: int, w_up: torch.Tensor | None, w_down: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's weights into pool ``slot`` (``None``: the adapter does not target this layer)."""
        bucket, pos = self.stacks.where[slot]
        self.set_position(bucket, pos, w_up, w_down, scaling)

    def set_position(
        self, bucket: int, pos: int, w_up: torch.Tensor | None, w_down: torch.Tensor | None, scaling: float
    ) -> None:
        write_slot(self.up[bucket], self.down[bucket], pos, w_up, w_down, scaling)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.up.values(), *self.down.values()]

    def stacked(self) -> dict[int, StackedAdapters]:
        """The bucket stacks as :class:`StackedAdapters` (rebuilt only when the layout changed)."""
        version, views = self._views
        if version != self.stacks.version:
            kinds, kind = self.stacks.kinds, self.stacks.kind
            views = {b: StackedAdapters(self.up[b], self.down[b], kind[b], kinds[b], ()) for b in self.up}
            self._views = (self.stacks.version, views)
        return views

    def backend(self) -> Backend:
        """The kernel backend for this layer's device and stack dtype (chosen once, on first use)."""
        backend = self.__dict__.get("_backend")
        if backend is None:
            w = self.base.weight
            backend = self.__dict__["_backend"] = select(w.device, compute_dtype(w.device, w.dtype))
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mapping = self.stacks.current
        if mapping is None or not mapping.segments:
            return out
        return segmented_add_(out, x, self.stacked(), mapping.segments, self.backend())
