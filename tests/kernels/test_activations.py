"""The one activation table: every name the config accepts, act(0) = 0, and backward = d forward (float64)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from nora_peft.kernels import activations
from nora_peft.kernels.activations import ACTIVATIONS, TABLE, activation_backward, activation_fn, get
from nora_peft.tuner.config import Activation

# independent of the table, in float64
REF = {
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "identity": lambda z: z,
    "relu": lambda z: torch.clamp(z, min=0),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
}


def test_table_is_the_configs_literal():
    assert ACTIVATIONS == get_args(Activation) == tuple(REF)
    assert len({a.triton_id for a in TABLE.values()}) == len(TABLE)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_backward_and_zero(name):
    z = torch.linspace(-3, 3, 41, dtype=torch.float64).reshape(-1)
    z = z[z != 0]  # relu's derivative at 0 is a convention
    torch.testing.assert_close(activation_fn(name)(z), REF[name](z), rtol=1e-12, atol=1e-12)
    zz = z.clone().requires_grad_(True)
    grad = torch.randn_like(z)
    (want,) = torch.autograd.grad(REF[name](zz), zz, grad)
    torch.testing.assert_close(activation_backward(name, grad, z), want, rtol=1e-10, atol=1e-10)
    assert float(get(name).forward(torch.zeros(1))) == 0.0  # rank padding relies on it


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown activation 'swish'; choose one of \('silu'"):
        get("swish")


def test_import_check_rejects_nonzero_at_zero_and_shared_ids():
    """The check run at import refuses an activation with act(0) != 0 (padding would break) and a reused id."""
    softplus = activations.Activation("softplus", torch.nn.functional.softplus, lambda g, z: g, 9)
    with pytest.raises(ValueError, match="'softplus' must map 0 to 0"):
        activations.check_table((*TABLE.values(), softplus))
    twin = activations.Activation("relu2", torch.relu, lambda g, z: g, TABLE["relu"].triton_id)
    with pytest.raises(ValueError, match="own triton_id"):
        activations.check_table((*TABLE.values(), twin))
