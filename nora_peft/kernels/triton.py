"""The Triton backend of the kernel seam: the NoRA branch as one fused kernel launch per adapted layer.

One kernel serves both situations of inference::

    out[b, t, :] += act_i( x[b, t, :] @ W_up_i^T ) @ (s_i W_down_i^T)      i = index[b]   (skip when i = -1)

Each program owns a tile of ``BLOCK_M`` tokens of one batch row and ``BLOCK_N`` output columns. It runs the shrink
over ``k`` into an fp32 ``(BLOCK_M, r)`` accumulator, applies the activation there (the place vLLM's shrink keeps
its fp32 buffer), multiplies by the tile's ``BLOCK_N`` columns of ``s W_down^T`` and adds into ``out`` -- shrink,
activation, expand and add in one launch. The r-wide shrink is recomputed by each column tile: for r << k that costs
less than a second launch and a round trip of the latent through memory.

* one adapter (:func:`add_`): every token of the batch is one "row" on slot 0, the activation a compile-time
  constant;
* mixed batches (:func:`mixed_add_`, BGMV-style): the slot is read from ``index`` per batch row, so the tokens of
  one row share their adapter's weights in a ``tl.dot``; rows on ``-1`` return at once; a stack of several
  activations switches per slot on ``activations.Activation.triton_id``;
* rank buckets (:func:`segmented_add_`, SGMV-style): one launch per bucket present in the batch.

Ranks are padded to a power of two (at least 16, ``tl.dot``'s minimum) with masked loads; that is exact because
act(0) = 0 (checked by ``activations.py``). This module imports triton; ``select.py`` imports it only when the Triton
backend is chosen, and tests run it on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

from .activations import TABLE

Tensor = torch.Tensor
_PER_SLOT = -1  # ACT value: read each slot's activation from the KIND table
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

assert [TABLE[n].triton_id for n in ("silu", "identity", "relu", "gelu", "tanh")] == [0, 1, 2, 3, 4], (
    "_activate's branches follow activations.TABLE's triton ids"
)


@triton.jit
def _activate(z, act):
    """Activation ``act`` (an ``Activation.triton_id`` read at run time) of the fp32 tile ``z``."""
    out = tl.where(act == 0, z / (1.0 + tl.exp(-z)), z)
    out = tl.where(act == 2, tl.maximum(z, 0.0), out)
    out = tl.where(act == 3, 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476)), out)
    return tl.where(act == 4, 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0, out)


@triton.jit
def _activate_const(z, ACT: tl.constexpr):
    """Activation ``ACT`` (a compile-time ``Activation.triton_id``) of the fp32 tile ``z``: one branch compiled."""
    if ACT == 0:
        out = z / (1.0 + tl.exp(-z))
    elif ACT == 2:
        out = tl.maximum(z, 0.0)
    elif ACT == 3:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 4:
        out = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
    else:
        out = z
    return out


@triton.jit
def _branch_kernel(
    X, UP, DOWN, OUT, INDEX, KIND, KIND_IDS,
    T, K, N, R,
    s_xb, s_xt, s_xk, s_us, s_ur, s_uk, s_ds, s_dr, s_dn, s_ob, s_ot, s_on,
    ACT: tl.constexpr, INDEXED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    slot = 0
    if INDEXED:
        slot = tl.load(INDEX + b)
        if slot < 0:
            return
    tok = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_R)
    tok_ok, col_ok, r_ok = tok < T, cols < N, rk < R
    # shrink: z = x W_up^T over k, in fp32
    z = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(
            X + b * s_xb + tok[:, None] * s_xt + kk[None, :] * s_xk, mask=tok_ok[:, None] & k_ok[None, :], other=0.0
        )
        up = tl.load(
            UP + slot * s_us + kk[:, None] * s_uk + rk[None, :] * s_ur, mask=k_ok[:, None] & r_ok[None, :], other=0.0
        )
        if UPCAST:  # the interpreter's tl.dot multiplies bf16/fp16 bit patterns: give it fp32 (exact products)
            x, up = x.to(tl.float32), up.to(tl.float32)
        if IEEE:
            z += tl.dot(x, up, input_precision="ieee")
        else:
            z += tl.dot(x, up)
    # activation in the fp32 accumulator
    if ACT == -1:
        a = _activate(z, tl.load(KIND_IDS + tl.load(KIND + slot)))
    else:
        a = _activate_const(z, ACT)
    # expand with the scaling folded into W_down^T, and add into out
    down = tl.load(
        DOWN + slot * s_ds + rk[:, None] * s_dr + cols[None, :] * s_dn, mask=r_ok[:, None] & col_ok[None, :], other=0.0
    )
    a = a.to(down.dtype)  # the latent in the weights' dtype, as the torch path rounds it
    if UPCAST:
        a, down = a.to(tl.float32), down.to(tl.float32)
    if IEEE:
        delta = tl.dot(a, down, input_precision="ieee")
    else:
        delta = tl.dot(a, down)
    ptr = OUT + b * s_ob + tok[:, None] * s_ot + cols[None, :] * s_on
    ok = tok_ok[:, None] & col_ok[None, :]
    old = tl.load(ptr, mask=ok, other=0.0)
    tl.store(ptr, (old.to(tl.float32) + delta).to(OUT.dtype.element_ty), mask=ok)


def _blocks(tokens: int, k: int, n: int, r: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R): at least 16 each (``tl.dot``), a smaller token tile for wide ranks."""
    block_r = max(16, triton.next_power_of_2(r))
    block_m = 16 if tokens <= 16 or block_r >= 128 else 32
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    return block_m, block_n, block_k, block_r


@functools.lru_cache(maxsize=64)
def _kind_ids(kinds: tuple[str, ...], device: torch.device) -> Tensor:
    """The triton id of each activation kind of a stack, on its device (cached: one copy per stack layout)."""
    return torch.tensor([TABLE[k].triton_id for k in kinds], dtype=torch.int32, device=device)


def _launch(
    out: Tensor, x: Tensor, up: Tensor, down: Tensor, index: Tensor | None, kind: Tensor | None, kinds: tuple[str, ...]
) -> Tensor:
    """Run the kernel on ``x (B, T, k)`` / ``out (B, T, d)`` views; ``up (S, r, k)``, ``down (S, r, d)``."""
    x3 = x if x.dtype == up.dtype else x.to(up.dtype)
    batch, tokens, k = x3.shape
    n, r = out.shape[-1], up.shape[1]
    bm, bn, bk, br = _blocks(tokens, k, n, r)
    act = TABLE[kinds[0]].triton_id if len(kinds) == 1 else _PER_SLOT
    kind_ids = _kind_ids(kinds, x3.device) if act == _PER_SLOT else up  # up: an unused placeholder pointer
    grid = (batch, triton.cdiv(tokens, bm), triton.cdiv(n, bn))
    _branch_kernel[grid](
        x3, up, down, out, up if index is None else index, up if kind is None else kind, kind_ids,
        tokens, k, n, r,
        *x3.stride(), *up.stride(), *down.stride(), *out.stride(),
        ACT=act, INDEXED=index is not None, IEEE=up.dtype == torch.float32,
        UPCAST=_INTERPRET and up.dtype != torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
    )  # fmt: skip
    return out


def _as_rows(out: Tensor, x: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(out, x)`` as ``(rows, T, ·)`` views; when ``out`` cannot be viewed, a zero buffer to add back afterwards."""
    x3 = x.reshape(rows, -1, x.shape[-1])
    try:
        return out.view(rows, -1, out.shape[-1]), x3, None
    except RuntimeError:  # a layout view() cannot express: accumulate into a buffer, then one add_
        buf = torch.zeros(rows, x3.shape[1], out.shape[-1], dtype=torch.float32, device=out.device)
        return buf, x3, buf


def add_(out: Tensor, x: Tensor, up: Tensor, down_t: Tensor, activation: str) -> Tensor:
    """``out += act(x W_up^T) down_t`` in one launch; same contract as ``reference.add_``."""
    out3, x3, buf = _as_rows(out, x, 1)
    _launch(out3, x3, up.unsqueeze(0), down_t.unsqueeze(0), None, None, (activation,))
    return out if buf is None else out.add_(buf.view(out.shape))


def mixed_add_(out: Tensor, x: Tensor, stacked: Any, index: Tensor) -> Tensor:
    """``out[b] += `` row ``b``'s branch under slot ``index[b]`` (``-1``: untouched); same contract as
    ``reference.mixed_add_``."""
    out3, x3, buf = _as_rows(out, x, x.shape[0])
    kind = stacked.kind if len(stacked.kinds) > 1 else None
    _launch(out3, x3, stacked.up, stacked.down, index, kind, stacked.kinds)
    return out if buf is None else out.add_(buf.view(out.shape))


def segmented_add_(out: Tensor, x: Tensor, stacks: Any, segments: Any) -> Tensor:
    """``out += `` the branch of a batch split into ``kernels.mixed.Segment`` s: one launch per segment (bucket)."""
    for seg in segments:
        mixed_add_(out, x, stacks[seg.key], seg.row_index)
    return out
