"""Stacked adapters for the mixed-adapter pass: many unmerged adapters on one shared base, one pass per layer.

This module lays adapters out (stacks, rank buckets, per-step segments); the pass itself runs through the kernel
seam (``reference.py`` in torch, ``triton.py`` fused; ``select.py`` picks).

A batch whose rows use different adapters -- NoRA of any activation, or LoRA (the identity activation with LoRA's
scaling) -- of any ranks up to ``r_max`` is computed without a Python loop over adapters, BGMV-style::

    idx  = per-row adapter index                    (B,)       -1: no adapter (the row is left untouched)
    z    = bmm(x, W_up[idx]^T)                      (B, T, r_max)      shrink
    a    = act_{kind[idx]}(z)                       (B, T, r_max)      per-adapter activation
    out  = bmm(a, (s * W_down^T)[idx])              (B, T, d)          expand

Slots are written by :func:`write_slot` (the one place that pads and folds the scaling): ``W_up`` fills the first
``r`` rows of its slot and ``s * W_down^T`` the first ``r`` rows of the down stack, the rest stays zero. Padding is
exact, because a padded latent unit contributes ``W_down[:, j] * act(0) = 0`` for every activation of
:data:`nora_peft.kernels.activations.ACTIVATIONS`.
``stack_adapters`` appends one all-zero slot that rows with index ``-1`` are routed to, so they get an exact zero.

**Rank buckets and segments** (SGMV-style, for a server whose adapters have very different ranks). Padding every
adapter to the largest rank makes an r=8 row pay for r=256 when one r=256 adapter is loaded. Instead, adapters are
stored in stacks per :func:`rank_bucket` (powers of two), and a batch is split into :class:`Segment` s, one per bucket
present in it (:func:`plan_segments`, computed once per step on the host). :func:`segmented_delta` runs one gathered
pass per segment, so a batch's adapter cost follows the ranks actually in it; rows without an adapter are in no
segment and cost nothing; a segment whose rows all use one adapter skips the gather (two plain matmuls).

Activations that differ between adapters are handled with a small per-row mask: each activation *kind* present in the
stack (at most the 5 of :data:`nora_peft.kernels.activations.ACTIVATIONS`) is applied to the whole r-wide latent and
the row's own result is selected with ``torch.where``. The loop runs over kinds, never over adapters; its cost is
``O(kinds * B * T * r_max)`` element-wise work, small next to the two ``O(B * T * r_max * k)`` matmuls, and a stack with
one kind (the common case) does no masking at all. Grouping rows per kind instead would need a host sync per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import reference
from .activations import get as get_activation
from .select import Backend, select

#: the smallest padded rank of a bucket; below it, padding costs less than another segment
MIN_BUCKET_RANK = 8


@dataclass(frozen=True)
class StackedAdapters:
    """Adapters stacked for the gathered pass: one slot each, every rank zero-padded to ``r_max``.

    Attributes:
        up: ``(S, r_max, k)`` -- each ``W_up`` zero-padded to ``r_max`` rows.
        down: ``(S, r_max, d)`` -- each ``s * W_down^T`` zero-padded to ``r_max`` rows.
        kind: ``(S,)`` long -- index into ``kinds`` of each slot's activation.
        kinds: the activation names present, e.g. ``("silu", "identity")``.
        names: the adapter name of each named slot (``stack_adapters``: all but the trailing all-zero slot).
    """

    up: torch.Tensor
    down: torch.Tensor
    kind: torch.Tensor
    kinds: tuple[str, ...]
    names: tuple[str, ...]

    def index(self, row_names: Sequence[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """Per-row slot indices for adapter names; names not in the stack (``None``, ``"__base__"``) get ``-1``.

        Cached on (stack names, row names, device): the layers of one model share the result within a forward.
        """
        return _row_index(self.names, tuple(row_names), torch.device(device or self.up.device))


@functools.lru_cache(maxsize=64)
def _row_index(names: tuple[str, ...], row_names: tuple, device: torch.device) -> torch.Tensor:
    slot = {n: i for i, n in enumerate(names)}
    return torch.tensor([slot.get(n, -1) for n in row_names], dtype=torch.long, device=device)


def rank_bucket(r: int) -> int:
    """The padded rank a rank-``r`` adapter is stored at: the next power of two, at least :data:`MIN_BUCKET_RANK`.

    Powers of two bound the number of buckets (at most 6 from 8 to 256) and the padding (less than 2x).
    """
    if r < 1:
        raise ValueError(f"An adapter rank must be >= 1; got {r}.")
    return max(MIN_BUCKET_RANK, 1 << (r - 1).bit_length())


@torch.no_grad()
def write_slot(
    up: torch.Tensor,
    down: torch.Tensor,
    slot: int,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor | None,
    scaling: float,
) -> None:
    """Write one adapter into ``slot`` of stacked ``up (S, r_max, k)`` / ``down (S, r_max, d)`` tensors.

    ``W_up (r, k)`` and ``scaling * W_down^T (r, d)`` fill the first ``r`` rows of their slots, the padding is zeroed;
    ``None`` (the adapter does not target this layer) leaves an all-zero slot, an exact no-op.
    """
    up[slot].zero_()
    down[slot].zero_()
    if w_up is None or w_down is None:
        return
    r, k = w_up.shape
    if r > up.shape[1] or k != up.shape[2] or w_down.shape != (down.shape[2], r):
        raise ValueError(
            f"W_up {tuple(w_up.shape)} / W_down {tuple(w_down.shape)} do not fit a stack of W_up (r<={up.shape[1]}, "
            f"{up.shape[2]}) and W_down ({down.shape[2]}, r); stack only adapters of the same layer, r <= r_max."
        )
    up[slot, :r] = w_up.detach().to(up)
    down[slot, :r] = w_down.detach().t() * scaling  # scaled in the adapter's dtype, then rounded once into the stack


def stack_adapters(
    adapters: Sequence[tuple[str, torch.Tensor, torch.Tensor, float, str]],
    *,
    r_max: int | None = None,
    dtype: torch.dtype | None = None,
) -> StackedAdapters:
    """Stack ``(name, W_up (r, k), W_down (d, r), scaling, activation)`` tuples for :func:`mixed_delta`.

    A LoRA adapter is ``(name, lora_A.weight, lora_B.weight, lora_scaling, "identity")``. ``r_max`` defaults to the
    largest rank. The stack has ``dtype`` (default: the first adapter's) and the first adapter's device, one trailing
    all-zero slot (for index ``-1``), and holds detached copies.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter; route rows without one to index -1 instead.")
    first_up = adapters[0][1]
    k, d = first_up.shape[1], adapters[0][2].shape[0]
    ranks = [a[1].shape[0] for a in adapters]
    r_max = r_max or max(ranks)
    if max(ranks) > r_max:
        raise ValueError(f"An adapter has rank {max(ranks)} > r_max={r_max}; raise r_max to at least {max(ranks)}.")
    kinds = tuple(dict.fromkeys(a[4] for a in adapters))
    for act in kinds:
        get_activation(act)  # validates the name
    up = first_up.new_zeros(len(adapters) + 1, r_max, k, dtype=dtype)
    down = first_up.new_zeros(len(adapters) + 1, r_max, d, dtype=dtype)
    for i, (name, w_up, w_down, scaling, _act) in enumerate(adapters):
        try:
            write_slot(up, down, i, w_up, w_down, scaling)
        except ValueError as e:
            raise ValueError(f"Adapter {name!r}: {e}") from None
    kind = torch.tensor([kinds.index(a[4]) for a in adapters] + [0], dtype=torch.long, device=up.device)
    return StackedAdapters(up=up, down=down, kind=kind, kinds=kinds, names=tuple(a[0] for a in adapters))


def mixed_delta(x: torch.Tensor, stacked: StackedAdapters, index: torch.Tensor) -> torch.Tensor:
    """The adapter branch of each row under its own adapter, in one gathered pass.

    ``x`` is ``(B, ..., k)``; ``index`` is ``(B,)`` slot indices into ``stacked`` (``-1``: the last slot, which
    ``stack_adapters`` leaves all-zero). Returns ``(B, ..., d)`` in the stack's dtype (``x`` is cast to it). Row ``b``
    equals ``s_i * W_down_i act_i(W_up_i x_b)`` for ``i = index[b]``.
    """
    if index.shape != (x.shape[0],):
        raise ValueError(f"index must have one entry per batch row: shape ({x.shape[0]},), got {tuple(index.shape)}.")
    # -1 -> the trailing all-zero slot
    return reference.gathered_delta(x, stacked, torch.remainder(index, stacked.up.shape[0]))


@dataclass(frozen=True)
class Segment:
    """The rows of a batch that use one stack (e.g. one rank bucket).

    Attributes:
        key: which stack (the bucket's padded rank in the server).
        rows: ``(n,)`` long, the batch rows of this segment; ``None`` when it is every row of the batch.
        index: ``(n,)`` long, each row's slot in that stack.
        slot: the slot every row uses when they all share one (the pass then needs no gather), else ``None``.
        activation: that slot's activation when ``slot`` is set.
        row_index: ``(B,)`` long, each batch row's slot in this stack, ``-1`` for rows outside the segment (what the
            Triton backend reads: one launch per segment, no row gather).
    """

    key: Hashable
    rows: torch.Tensor | None
    index: torch.Tensor
    slot: int | None = None
    activation: str | None = None
    row_index: torch.Tensor | None = None


def plan_segments(
    row_slots: Sequence[tuple[Hashable, int] | None],
    activations: Mapping[tuple[Hashable, int], str] | None = None,
    device: torch.device | str | None = None,
) -> tuple[Segment, ...]:
    """Group batch rows by stack: ``row_slots[b]`` is ``(key, slot)`` or ``None`` (no adapter: in no segment).

    Computed on the host once per step and shared by every layer. ``activations[(key, slot)]`` lets a segment whose
    rows share one slot skip the gather.
    """
    groups: dict[Hashable, list[tuple[int, int]]] = {}
    for row, ks in enumerate(row_slots):
        if ks is not None:
            groups.setdefault(ks[0], []).append((row, ks[1]))
    segments = []
    for key, members in groups.items():
        rows = [r for r, _ in members]
        slots = [s for _, s in members]
        every_row = len(rows) == len(row_slots)
        shared = slots[0] if activations is not None and len(set(slots)) == 1 else None
        row_index = [-1] * len(row_slots)
        for r, s in members:
            row_index[r] = s
        segments.append(
            Segment(
                key=key,
                rows=None if every_row else torch.tensor(rows, dtype=torch.long, device=device),
                index=torch.tensor(slots, dtype=torch.long, device=device),
                slot=shared,
                activation=None if shared is None else activations[(key, shared)],
                row_index=torch.tensor(row_index, dtype=torch.long, device=device),
            )
        )
    return tuple(segments)


def segmented_delta(
    x: torch.Tensor, stacks: Mapping[Hashable, StackedAdapters], segments: Sequence[Segment]
) -> torch.Tensor | None:
    """The adapter branch of a batch split into segments: one pass per segment; ``None`` when no row has an adapter.

    ``x`` is ``(B, ..., k)``; returns ``(B, ..., d)`` in the stacks' dtype, zero on rows in no segment (the torch
    backend; a layer adds into its output in place with :func:`segmented_add_` instead).
    """
    if not segments:
        return None
    dtype = next(iter(stacks.values())).up.dtype
    out = torch.zeros(*x.shape[:-1], stacks[segments[0].key].down.shape[-1], dtype=dtype, device=x.device)
    return reference.segmented_add_(out, x, stacks, segments)


def segmented_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    stacks: Mapping[Hashable, StackedAdapters],
    segments: Sequence[Segment],
    backend: Backend | None = None,
) -> torch.Tensor:
    """``out += `` the branch of each row under its segment's adapter, in place, through ``backend`` (default: the
    one :func:`~.select.select` picks for ``out``'s device and the stacks' dtype)."""
    if segments:
        backend = backend or select(out.device, next(iter(stacks.values())).up.dtype)
        backend.segmented_add_(out, x, stacks, segments)
    return out
