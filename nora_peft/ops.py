"""The math every NoRA path shares (torch only).

NoRA (paper, Eq. 2) adds a non-linear low-rank branch to a frozen linear map ``W0``::

    h = W0 x + s * W_down( D( act( W_up x ) ) )      W_up: (r, k),  W_down: (d, r)

``nora_delta`` computes the branch ``s * W_down D(act(W_up x))`` as one autograd function. For backward it keeps
only what it cannot cheaply rebuild:

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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("silu", "identity", "relu", "gelu", "tanh")


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise activation ``name`` (one of :data:`ACTIVATIONS`) as a function."""
    if name == "silu":
        return F.silu
    if name == "identity":
        return lambda z: z
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu  # exact erf form, torch's default
    if name == "tanh":
        return torch.tanh
    raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


def activation_and_grad(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(act(z), act'(z))``; the derivative is ``None`` for the identity (multiplying by 1 is skipped)."""
    if name == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1 + z * (1 - sig))
    if name == "identity":
        return z, None
    if name == "relu":
        return F.relu(z), (z > 0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return z * cdf, cdf + z * pdf
    if name == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


class _NoraDelta(torch.autograd.Function):
    """Autograd function for ``s * W_down D(act(W_up x))``; see the module docstring for what it saves."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, scaling, activation, dropout_p, training):  # type: ignore[override]
        z = x @ w_up.t()
        a = activation_fn(activation)(z)
        mask = None
        if training and dropout_p > 0:
            mask = torch.rand_like(z) >= dropout_p
            a = a * mask * (1.0 / (1.0 - dropout_p))
        out = (a @ w_down.t()) * scaling
        ctx.save_for_backward(x, z, mask, w_up, w_down)
        ctx.scaling, ctx.activation, ctx.dropout_p = scaling, activation, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, z, mask, w_up, w_down = ctx.saved_tensors
        # Under autocast the forward matmuls may have run in a lower precision than the weights: do the backward
        # math in the dtype z was produced in, and hand each gradient back in its input's dtype.
        dt = z.dtype
        g = grad_out.to(dt) * ctx.scaling
        a, da = activation_and_grad(ctx.activation, z)
        keep = None
        if mask is not None:
            keep = mask.to(dt) * (1.0 / (1.0 - ctx.dropout_p))
            a = a * keep
        grad_w_down = grad_x = grad_w_up = None
        if ctx.needs_input_grad[2]:
            grad_w_down = (g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])).to(w_down.dtype)
        gz = g @ w_down.to(dt)
        if keep is not None:
            gz = gz * keep
        if da is not None:
            gz = gz * da
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
