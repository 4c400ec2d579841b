"""The one table of NoRA activations: name -> forward, backward and the id the Triton kernels switch on.

Every place that applies or validates an activation reads this table: ``NoraConfig`` validation, the training
autograd function, the inference fast path, the mixed-adapter pass, the server's stacked layers and the Triton
kernels. A new activation is one row here plus one branch in ``triton.py``'s ``_activate``.

Rank padding relies on ``act(0) = 0``: a zero-padded latent unit then contributes ``W_down[:, j] * act(0) = 0``, so
stacking adapters of different ranks (and routing rows without an adapter to an all-zero slot) stays exact. The
table checks this at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Activation:
    """One element-wise activation.

    Attributes:
        name: the name used in ``NoraConfig.activation`` and adapter configs.
        forward: ``act(z)``.
        backward: ``(grad, z) -> grad * act'(z)``, through torch's fused backward kernels where they exist.
        triton_id: the constant the Triton kernels switch on (``triton.py``).
    """

    name: str
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]
    triton_id: int


def _identity(z: Tensor) -> Tensor:
    return z


def _identity_backward(grad: Tensor, z: Tensor) -> Tensor:
    return grad


_TABLE: tuple[Activation, ...] = (
    Activation("silu", F.silu, torch.ops.aten.silu_backward, 0),
    Activation("identity", _identity, _identity_backward, 1),
    Activation("relu", F.relu, lambda grad, z: grad.masked_fill(z <= 0, 0), 2),
    # exact erf form, torch's default, for both directions
    Activation("gelu", F.gelu, torch.ops.aten.gelu_backward, 3),
    Activation("tanh", torch.tanh, lambda grad, z: torch.ops.aten.tanh_backward(grad, torch.tanh(z)), 4),
)

#: name -> :class:`Activation`
TABLE: dict[str, Activation] = {a.name: a for a in _TABLE}
#: the activation names, in the order of ``NoraConfig``'s ``Activation`` literal
ACTIVATIONS: tuple[str, ...] = tuple(TABLE)


def check_table(table: tuple[Activation, ...]) -> None:
    """Raise ``ValueError`` unless every activation maps 0 to 0 and the Triton ids are distinct (run at import).

    Rank padding and the all-zero slot for rows without an adapter rely on ``act(0) = 0``.
    """
    for act in table:
        if float(act.forward(torch.zeros(1, dtype=torch.float64))) != 0.0:
            raise ValueError(f"Activation {act.name!r} must map 0 to 0: zero-padded ranks would no longer be exact.")
    if len({a.triton_id for a in table}) != len(table):
        raise ValueError("Each activation needs its own triton_id (the Triton kernels switch on it).")


check_table(_TABLE)


def get(name: str) -> Activation:
    """The activation called ``name``; ``ValueError`` naming the choices for an unknown name."""
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.") from None


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The element-wise activation ``name`` (one of :data:`ACTIVATIONS`) as a function."""
    return get(name).forward


def activation_backward(name: str, grad: Tensor, z: Tensor) -> Tensor:
    """``grad * act'(z)`` for activation ``name``."""
    return get(name).backward(grad, z)
