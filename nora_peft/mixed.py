"""The gathered mixed-adapter pass: many unmerged adapters on one shared base, one pass per layer (torch only).

A batch whose rows use different adapters -- NoRA of any activation, or LoRA (the identity activation with LoRA's
scaling) -- of any ranks up to ``r_max`` is computed without a Python loop over adapters, BGMV-style::

    idx  = per-row adapter index                    (B,)       -1: no adapter (the row is left untouched)
    z    = bmm(x, W_up[idx]^T)                      (B, T, r_max)      shrink
    a    = act_{kind[idx]}(z)                       (B, T, r_max)      per-adapter activation
    out  = bmm(a, (s * W_down)[idx]^T)              (B, T, d)          expand

``stack_adapters`` pads every adapter to ``r_max`` with zero rows of ``W_up`` and zero columns of ``W_down`` (a
padded latent unit contributes ``W_down[:, j] * act(0) = 0``), folds the scaling ``s`` into ``W_down``, and appends one
all-zero slot that rows with index ``-1`` are routed to, so they receive an exact zero delta.

Activations that differ between adapters are handled with a small per-row mask: each activation *kind* present in the
stack (at most the 5 of :data:`nora_peft.ops.ACTIVATIONS`) is applied to the whole r-wide latent and the row's own
result is selected with ``torch.where``. The loop runs over kinds, never over adapters; its cost is
``O(kinds * B * T * r_max)`` element-wise work, small next to the two ``O(B * T * r_max * k)`` matmuls, and a stack with
one kind (the common case) does no masking at all. Grouping rows per kind instead would need a host sync per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ops import activation_fn


@dataclass(frozen=True)
class StackedAdapters:
    """Adapters stacked for the gathered pass. ``A`` adapters plus one trailing all-zero slot (index ``A``).

    Attributes:
        up: ``(A + 1, r_max, k)`` -- each ``W_up`` zero-padded to ``r_max`` rows.
        down: ``(A + 1, d, r_max)`` -- each ``s * W_down`` zero-padded to ``r_max`` columns.
        kind: ``(A + 1,)`` long -- index into ``kinds`` of each slot's activation.
        kinds: the activation names present, e.g. ``("silu", "identity")``.
        names: the adapter name of each of the first ``A`` slots.
    """

    up: torch.Tensor
    down: torch.Tensor
    kind: torch.Tensor
    kinds: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def none_slot(self) -> int:
        """The all-zero slot that rows with index ``-1`` use."""
        return self.up.shape[0] - 1

    def index(self, row_names: Sequence[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """Per-row slot indices for adapter names; names not in the stack (``None``, ``"__base__"``) get ``-1``.

        Cached on (stack names, row names, device): the layers of one model share the result within a forward.
        """
        return _row_index(self.names, tuple(row_names), torch.device(device or self.up.device))


@functools.lru_cache(maxsize=64)
def _row_index(names: tuple[str, ...], row_names: tuple, device: torch.device) -> torch.Tensor:
    slot = {n: i for i, n in enumerate(names)}
    return torch.tensor([slot.get(n, -1) for n in row_names], dtype=torch.long, device=device)


def stack_adapters(
    adapters: Sequence[tuple[str, torch.Tensor, torch.Tensor, float, str]],
    *,
    r_max: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> StackedAdapters:
    """Stack ``(name, W_up (r, k), W_down (d, r), scaling, activation)`` tuples for :func:`mixed_delta`.

    A LoRA adapter is ``(name, lora_A.weight, lora_B.weight, lora_scaling, "identity")``. ``r_max`` defaults to the
    largest rank; ``dtype``/``device`` default to the first adapter's. The result holds detached copies.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter; route rows without one to index -1 instead.")
    first_up = adapters[0][1]
    k = first_up.shape[1]
    d = adapters[0][2].shape[0]
    dtype = dtype or first_up.dtype
    device = device or first_up.device
    ranks = [a[1].shape[0] for a in adapters]
    r_max = r_max or max(ranks)
    if max(ranks) > r_max:
        raise ValueError(f"An adapter has rank {max(ranks)} > r_max={r_max}; raise r_max to at least {max(ranks)}.")
    kinds = tuple(dict.fromkeys(a[4] for a in adapters))
    for act in kinds:
        activation_fn(act)  # validates the name
    up = torch.zeros(len(adapters) + 1, r_max, k, dtype=dtype, device=device)
    down = torch.zeros(len(adapters) + 1, d, r_max, dtype=dtype, device=device)
    with torch.no_grad():
        for i, (name, w_up, w_down, scaling, _act) in enumerate(adapters):
            r = w_up.shape[0]
            if w_up.shape != (r, k) or w_down.shape != (d, r):
                raise ValueError(
                    f"Adapter {name!r} has W_up {tuple(w_up.shape)} and W_down {tuple(w_down.shape)}; this stack "
                    f"needs W_up (r, {k}) and W_down ({d}, r). Stack only adapters of the same layer."
                )
            up[i, :r] = w_up.detach().to(device=device, dtype=dtype)
            down[i, :, :r] = w_down.detach().to(device=device, dtype=dtype) * scaling
    kind = torch.tensor([kinds.index(a[4]) for a in adapters] + [0], dtype=torch.long, device=device)
    return StackedAdapters(up=up, down=down, kind=kind, kinds=kinds, names=tuple(a[0] for a in adapters))


def mixed_delta(x: torch.Tensor, stacked: StackedAdapters, index: torch.Tensor) -> torch.Tensor:
    """The adapter branch of each row under its own adapter, in one gathered pass.

    ``x`` is ``(B, ..., k)``; ``index`` is ``(B,)`` slot indices into ``stacked`` (``-1``: no adapter, zero delta).
    Returns ``(B, ..., d)`` in the stack's dtype (``x`` is cast to it). Row ``b`` equals
    ``s_i * W_down_i act_i(W_up_i x_b)`` for ``i = index[b]``.
    """
    if index.shape != (x.shape[0],):
        raise ValueError(f"index must have one entry per batch row: shape ({x.shape[0]},), got {tuple(index.shape)}.")
    batch, k = x.shape[0], x.shape[-1]
    x3 = x.reshape(batch, -1, k).to(stacked.up.dtype)
    idx = torch.remainder(index, stacked.up.shape[0])  # -1 -> the trailing all-zero slot
    z = torch.bmm(x3, stacked.up.index_select(0, idx).transpose(1, 2))  # shrink: (B, T, r_max)
    a = _activate(z, stacked, idx)
    out = torch.bmm(a, stacked.down.index_select(0, idx).transpose(1, 2))  # expand: (B, T, d), scaling folded in
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _activate(z: torch.Tensor, stacked: StackedAdapters, idx: torch.Tensor) -> torch.Tensor:
    """Apply each row's activation; one kind -> no mask, several -> one ``where`` per extra kind."""
    kinds = stacked.kinds
    out = activation_fn(kinds[0])(z)
    if len(kinds) == 1:
        return out
    row_kind = stacked.kind.index_select(0, idx)
    for j, name in enumerate(kinds[1:], start=1):
        out = torch.where((row_kind == j).view(-1, 1, 1), activation_fn(name)(z), out)
    return out
