"""The torch backend of the kernel seam: every NoRA path in plain torch ops, on any device and dtype.

NoRA (paper, Eq. 2) adds a non-linear low-rank branch to a frozen linear map ``W0``::

    h = W0 x + s * W_down( D( act( W_up x ) ) )      W_up: (r, k),  W_down: (d, r)

Three entry points, one per situation (``select.py`` picks this backend or ``triton.py``, which has the same
``add_`` / ``mixed_add_`` / ``segmented_add_``):

* :func:`nora_delta` -- training: one autograd function (below);
* :func:`add_` -- inference with one adapter: no autograd, the scaling already folded into ``W_down``, the branch
  accumulated into the base output in place (``addmm_``);
* :func:`mixed_add_` / :func:`segmented_add_` -- inference with a per-row adapter index over stacked adapters (the
  gathered pass of ``kernels.mixed``).

**Training.** ``nora_delta`` computes the branch ``s * W_down D(act(W_up x))`` as one autograd function. For backward
it keeps only what it cannot cheaply rebuild:

* ``x``  -- a *reference* to the layer input, which the surrounding graph already holds (no k-wide copy is made;
  a copy only exists when the input has to be cast to the adapter dtype, exactly as in peft's LoRA),
* ``z = W_up x`` -- the r-dim pre-activation, from which ``act(z)`` and ``act'(z)`` are recomputed,
* the dropout keep-mask as ``bool`` (r bytes per token), only when dropout is active.

Saved activation memory per token per adapted layer (fp32 adapter, input already in adapter dtype):

=====================  ===========================================================
NoRA, dropout p > 0    4r (z) + r (bool mask) bytes
NoRA, p = 0            4r bytes
peft LoRA, p = 0       4r bytes (``A x`` for ``B``'s gradient)
peft LoRA, p > 0       4k (dropped-out input copy) + k (mask) + 4r bytes
=====================  ===========================================================

so NoRA with latent dropout saves at most r bytes more than LoRA without dropout, and ~5k bytes less than LoRA with
its (input) dropout.
"""

from __future__ import annotations

from typing import Any

import torch

from .activations import activation_backward, activation_fn, get

Tensor = torch.Tensor


class _NoraDelta(torch.autograd.Function):
    """Autograd function for ``s * W_down D(act(W_up x))``; see the module docstring for what it saves.

    The scalar ``s`` and the dropout rescaling ``1/(1-p)`` are applied to the r-wide latent, not the d-wide output:
    ``s * W_down (m * a) == W_down (a * (s * m))``, and the latent is the narrow side (r << d).
    """

    @staticmethod
    def forward(ctx, x, w_up, w_down, scaling, activation, dropout_p, training):  # type: ignore[override]
        z = x @ w_up.t()
        a = activation_fn(activation)(z)
        mask = None
        if training and dropout_p > 0:
            mask = torch.rand_like(z) >= dropout_p
            a = a * (mask.to(a.dtype) * (scaling / (1.0 - dropout_p)))
        else:
            a = a * scaling
        out = a @ w_down.t()
        ctx.save_for_backward(x, z, mask, w_up, w_down)
        ctx.scaling, ctx.activation, ctx.dropout_p = scaling, activation, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, z, mask, w_up, w_down = ctx.saved_tensors
        # Under autocast the forward matmuls may have run in a lower precision than the weights: do the backward
        # math in the dtype z was produced in, and hand each gradient back in its input's dtype.
        dt = z.dtype
        g = grad_out.to(dt)
        # factor = d(latent fed to W_down) / d(act(z)): s, times the scaled keep-mask when dropout was active
        factor = ctx.scaling if mask is None else mask.to(dt) * (ctx.scaling / (1.0 - ctx.dropout_p))
        grad_w_down = grad_x = grad_w_up = None
        if ctx.needs_input_grad[2]:
            a = activation_fn(ctx.activation)(z) * factor
            grad_w_down = (g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])).to(w_down.dtype)
        gz = activation_backward(ctx.activation, (g @ w_down.to(dt)) * factor, z)
        if ctx.needs_input_grad[1]:
            grad_w_up = (gz.reshape(-1, gz.shape[-1]).t() @ x.to(dt).reshape(-1, x.shape[-1])).to(w_up.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (gz @ w_up.to(dt)).to(x.dtype)
        return grad_x, grad_w_up, grad_w_down, None, None, None, None


def nora_delta(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scaling: float,
    activation: str = "silu",
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The NoRA branch ``scaling * W_down D(act(W_up x))`` for ``x`` of shape ``(..., k)``.

    ``w_up`` is ``(r, k)`` and ``w_down`` is ``(d, r)`` (``nn.Linear`` layout); the result is ``(..., d)`` in the
    dtype of ``x``. Dropout acts on the r-dim latent and only when ``training`` is true.
    """
    return _NoraDelta.apply(x, w_up, w_down, float(scaling), activation, float(dropout_p), bool(training))


def nora_delta_reference(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scaling: float,
    activation: str = "silu",
) -> torch.Tensor:
    """Eq. 2's branch in eval mode with plain torch ops (autograd-friendly); used as a reference and for analysis."""
    return activation_fn(activation)(x @ w_up.t()) @ w_down.t() * scaling


# -- inference: one adapter ---------------------------------------------------------------------------------------
def add_(out: Tensor, x: Tensor, up: Tensor, down_t: Tensor, activation: str) -> Tensor:
    """``out += act(x W_up^T) down_t`` in place, without autograd; returns ``out``.

    ``x`` is ``(..., k)`` and ``out`` ``(..., d)`` with the same leading shape; ``up`` is ``(r, k)`` and ``down_t``
    ``(r, d)`` = ``s * W_down^T`` (the scaling folded in), both in the compute dtype (``x`` is cast to it). When
    ``out`` is contiguous and in the compute dtype the expand is one ``addmm_`` into it; otherwise the delta is
    added (and cast) in one ``add_``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != up.dtype:
        x2 = x2.to(up.dtype)
    a = get(activation).forward(x2 @ up.t())
    if out.dtype == down_t.dtype and out.is_contiguous():
        out.view(-1, out.shape[-1]).addmm_(a, down_t)
    else:
        out.add_((a @ down_t).view(out.shape))
    return out


# -- inference: a per-row adapter index over stacked adapters ---------------------------------------------------------
def gathered_delta(x: Tensor, stacked: Any, idx: Tensor) -> Tensor:
    """Each row's branch under slot ``idx[b]`` (non-negative) of ``stacked`` (a ``kernels.mixed.StackedAdapters``).

    ``x`` is ``(B, ..., k)``; returns ``(B, ..., d)`` in the stack's dtype::

        z   = bmm(x, W_up[idx]^T)          (B, T, r_max)   shrink
        a   = act_{kind[idx]}(z)           (B, T, r_max)   each row's activation
        out = bmm(a, (s W_down^T)[idx])    (B, T, d)       expand, scaling folded in
    """
    batch, k = x.shape[0], x.shape[-1]
    x3 = x.reshape(batch, -1, k).to(stacked.up.dtype)
    z = torch.bmm(x3, stacked.up.index_select(0, idx).transpose(1, 2))
    a = _activate(z, stacked, idx)
    out = torch.bmm(a, stacked.down.index_select(0, idx))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _activate(z: Tensor, stacked: Any, idx: Tensor) -> Tensor:
    """Apply each row's activation; one kind -> no mask, several -> one ``where`` per extra kind.

    The loop runs over activation kinds (at most 5), never over adapters; grouping rows per kind instead would need
    a host sync per layer.
    """
    kinds = stacked.kinds
    out = activation_fn(kinds[0])(z)
    if len(kinds) == 1:
        return out
    row_kind = stacked.kind.index_select(0, idx)
    for j, name in enumerate(kinds[1:], start=1):
        out = torch.where((row_kind == j).view(-1, 1, 1), activation_fn(name)(z), out)
    return out


def mixed_add_(out: Tensor, x: Tensor, stacked: Any, index: Tensor) -> Tensor:
    """``out[b] += branch of row b under slot index[b]`` of ``stacked``; rows with ``index = -1`` are untouched.

    ``out`` is ``(B, ..., d)``, ``x`` ``(B, ..., k)``, ``index`` ``(B,)``. Rows on ``-1`` are gathered on slot 0 and
    their delta replaced by zeros (not multiplied by 0: an overflowed inf would become NaN), so no host sync is needed
    to find them.
    """
    delta = gathered_delta(x, stacked, index.clamp(min=0))
    return out.add_(delta.masked_fill_((index < 0).view(-1, *([1] * (delta.dim() - 1))), 0))


def segmented_add_(out: Tensor, x: Tensor, stacks: Any, segments: Any) -> Tensor:
    """``out += `` the branch of a batch split into ``kernels.mixed.Segment`` s, one pass per segment.

    ``stacks`` maps each segment's key to its ``StackedAdapters``. A segment whose rows share one slot skips the
    gather (two plain matmuls); rows in no segment are untouched.
    """
    for seg in segments:
        stacked = stacks[seg.key]
        if seg.rows is None:
            delta = _segment_delta(x, stacked, seg)
            out.add_(delta.view(out.shape))
        else:
            delta = _segment_delta(x.index_select(0, seg.rows), stacked, seg)
            out.index_add_(0, seg.rows, delta.to(out.dtype))
    return out


def _segment_delta(x: Tensor, stacked: Any, seg: Any) -> Tensor:
    if seg.slot is None:
        return gathered_delta(x, stacked, seg.index)
    x = x.to(stacked.up.dtype)  # one adapter for every row: two plain matmuls, no per-row copies of the weights
    return activation_fn(seg.activation)(x @ stacked.up[seg.slot].t()) @ stacked.down[seg.slot]
