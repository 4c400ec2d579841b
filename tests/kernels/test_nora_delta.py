"""The training branch (kernels.reference.nora_delta) against an independent float64 formula; what it saves."""

from __future__ import annotations

import math

import pytest
import torch

from nora_peft.kernels.activations import ACTIVATIONS
from nora_peft.kernels.reference import nora_delta, nora_delta_reference

# Written out independently of nora_peft.kernels (no shared helper), in float64.
REFERENCE_ACTS = {
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "identity": lambda z: z,
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
}


def _inputs(k=12, r=5, d=7, batch=(3, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, k, generator=g, dtype=dtype, requires_grad=True)
    w_up = torch.randn(r, k, generator=g, dtype=dtype, requires_grad=True)
    w_down = torch.randn(d, r, generator=g, dtype=dtype, requires_grad=True)
    return x, w_up, w_down


def _eq2(x, w_up, w_down, s, act, mask=None, p=0.0):
    """Eq. 2's branch: s * W_down D(act(W_up x)), summed by hand over indices."""
    z = torch.einsum("...k,rk->...r", x, w_up)
    a = REFERENCE_ACTS[act](z)
    if mask is not None:
        a = a * mask / (1 - p)
    return s * torch.einsum("...r,dr->...d", a, w_down)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_forward_and_grads_match_float64_formula(act):
    x, w_up, w_down = _inputs()
    out = nora_delta(x, w_up, w_down, 0.7, act)
    ref = _eq2(x, w_up, w_down, 0.7, act)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_up, w_down), g)
    ref_grads = torch.autograd.grad(ref, (x, w_up, w_down), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ["silu", "gelu", "tanh"])
def test_gradcheck(act):
    x, w_up, w_down = _inputs(k=4, r=3, d=2, batch=(2,))
    assert torch.autograd.gradcheck(lambda a, b, c: nora_delta(a, b, c, 1.3, act), (x, w_up, w_down))


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_latent_dropout_matches_formula_with_the_same_mask(act):
    x, w_up, w_down = _inputs(batch=(64,))
    p = 0.3
    torch.manual_seed(123)
    out = nora_delta(x, w_up, w_down, 2.0, act, dropout_p=p, training=True)
    torch.manual_seed(123)  # the same draw reproduces the mask over the (…, r) latent
    mask = (torch.rand(64, w_up.shape[0], dtype=x.dtype) >= p).to(x.dtype)
    ref = _eq2(x, w_up, w_down, 2.0, act, mask=mask, p=p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, w_up, w_down), g), torch.autograd.grad(ref, (x, w_up, w_down), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # dropout really drops: some latent units are zero, and eval mode is deterministic
    assert 0 < (mask == 0).float().mean() < 1
    e1 = nora_delta(x, w_up, w_down, 2.0, act, dropout_p=p, training=False)
    torch.testing.assert_close(e1, _eq2(x, w_up, w_down, 2.0, act))


def test_reference_helper_agrees():
    x, w_up, w_down = _inputs()
    torch.testing.assert_close(nora_delta_reference(x, w_up, w_down, 0.5, "silu"), _eq2(x, w_up, w_down, 0.5, "silu"))


def test_saves_no_k_wide_copy_of_the_input():
    """Only the input itself (by reference), the r-dim pre-activation, the r-dim mask and the weights are saved."""
    k, r, d, n = 64, 4, 32, 10
    x = torch.randn(n, k, requires_grad=True)
    w_up = torch.randn(r, k, requires_grad=True)
    w_down = torch.randn(d, r, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nora_delta(x, w_up, w_down, 1.0, "silu", dropout_p=0.1, training=True).sum().backward()
    params = {w_up.data_ptr(), w_down.data_ptr()}
    activations = [t for t in saved if t.data_ptr() not in params]
    k_wide = [t for t in activations if t.shape[-1] == k]
    assert all(t.data_ptr() == x.data_ptr() for t in k_wide), "a k-wide copy of the input was saved"
    others = [t for t in activations if t.data_ptr() != x.data_ptr()]
    assert sorted(tuple(t.shape) for t in others) == [(n, r), (n, r)]
    assert {t.dtype for t in others} == {torch.float32, torch.bool}


def test_mixed_precision_backward_keeps_dtypes():
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    w_up = torch.randn(4, 8, requires_grad=True)
    w_down = torch.randn(5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nora_delta(x, w_up, w_down, 1.0, "silu")
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w_up.grad.dtype == torch.float32 and w_down.grad.dtype == torch.float32
    assert torch.isfinite(w_up.grad).all() and torch.isfinite(w_down.grad).all()


def test_unknown_activation_is_rejected():
    x, w_up, w_down = _inputs()
    with pytest.raises(ValueError, match="Unknown activation 'swish'"):
        nora_delta(x, w_up, w_down, 1.0, "swish")


def test_tuner_ops_names_the_seams_functions():
    """``nora_peft.tuner.ops`` (and the package root) keep exporting the branch the seam computes."""
    import nora_peft
    from nora_peft.kernels import activations, reference
    from nora_peft.tuner import ops

    assert ops.nora_delta is reference.nora_delta is nora_peft.nora_delta
    assert ops.activation_fn is activations.activation_fn and ops.ACTIVATIONS == activations.ACTIVATIONS
