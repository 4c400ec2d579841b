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


def activation_backward(name: str, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``grad * act'(z)``, through torch's fused backward kernels where they exist (one pass over the latent)."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    if name == "identity":
        return grad
    if name == "relu":
        return grad.masked_fill(z <= 0, 0)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)  # exact erf form, like F.gelu's default
    if name == "tanh":
        return torch.ops.aten.tanh_backward(grad, torch.tanh(z))
    raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


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
