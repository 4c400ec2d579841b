"""The torch backend's inference entry points against an independent float64 formula."""

from __future__ import annotations

import pytest
import torch

from nora_peft.kernels import reference
from nora_peft.kernels.activations import ACTIVATIONS
from nora_peft.kernels.mixed import plan_segments, stack_adapters

from .test_activations import REF

D64 = torch.float64
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def eq2(x, up, down, s, act):
    """``s * W_down act(W_up x)`` in float64."""
    return REF[act](x.double() @ up.double().t()) @ down.double().t() * s


def _weights(r, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g, dtype=D64) / k**0.5, torch.randn(d, r, generator=g, dtype=D64) / r**0.5


def assert_close_rel(got, want, dtype, base=None):
    """Max error relative to the largest magnitude of the reference (and of the ``base`` output it was added to: the
    sum is rounded at that scale), within the dtype's tolerance."""
    scale = want.abs().max() if base is None else max(want.abs().max(), base.abs().max())
    err = (got.double() - want).abs().max() / scale.clamp(min=1e-30)
    assert err <= TOL[dtype], f"relative error {float(err):.2e} > {TOL[dtype]:.0e} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_add_is_eq2_in_place(act, dtype):
    k, d, r, s = 24, 10, 5, 1.7
    up, down = _weights(r, k, d, 0)
    x = torch.randn(2, 3, k, dtype=D64)
    base = torch.randn(2, 3, d, dtype=D64)
    out = base.to(dtype, copy=True)
    ptr = out.data_ptr()
    reference.add_(out, x.to(dtype), up.to(dtype), (down.t() * s).to(dtype), act)
    assert out.data_ptr() == ptr  # accumulated into the given tensor
    assert_close_rel(out.double() - base.to(dtype).double(), eq2(x, up, down, s, act), dtype, base)


def test_add_into_a_strided_or_other_dtype_output():
    k, d, r = 8, 6, 3
    up, down = _weights(r, k, d, 1)
    x = torch.randn(4, k, dtype=D64)
    want = eq2(x, up, down, 1.0, "silu")
    wide = torch.zeros(4, 2 * d, dtype=D64)
    reference.add_(wide[:, ::2], x, up, down.t().contiguous(), "silu")  # not contiguous: the add_ fallback
    torch.testing.assert_close(wide[:, ::2], want)
    assert torch.equal(wide[:, 1::2], torch.zeros(4, d, dtype=D64))
    out = torch.zeros(4, d, dtype=torch.bfloat16)  # fp32 weights into a bf16 output
    reference.add_(out, x.float(), up.float(), down.t().float().contiguous(), "silu")
    assert_close_rel(out, want, torch.bfloat16)


def test_mixed_add_leaves_rows_without_adapter_untouched():
    k, d = 12, 7
    adapters = [("a", *_weights(3, k, d, 2), 2.0, "silu"), ("b", *_weights(8, k, d, 3), 0.5, "tanh")]
    stacked = stack_adapters(adapters)
    x = torch.randn(4, 2, k, dtype=D64)
    base = torch.randn(4, 2, d, dtype=D64)
    out = base.clone()
    index = torch.tensor([1, -1, 0, 1])
    reference.mixed_add_(out, x, stacked, index)
    assert torch.equal(out[1], base[1])
    for row, i in enumerate(index.tolist()):
        if i >= 0:
            _, up, down, s, act = adapters[i]
            torch.testing.assert_close(out[row] - base[row], eq2(x[row], up, down, s, act), rtol=1e-12, atol=1e-12)


def test_mixed_add_rows_without_adapter_stay_untouched_when_slot_0_overflows():
    """A row on ``-1`` is computed against slot 0 and thrown away: an inf there must not reach the row as NaN."""
    k, d = 12, 7
    up, down = _weights(3, k, d, 2)
    stacked = stack_adapters([("a", up.float() * 1e30, down.float() * 1e30, 1.0, "identity")])
    x, base = torch.randn(2, 2, k), torch.randn(2, 2, d)
    out = base.clone()
    reference.mixed_add_(out, x, stacked, torch.tensor([-1, -1]))
    assert torch.equal(out, base)


def test_segmented_add_over_two_stacks():
    k, d = 12, 7
    small = [("a", *_weights(3, k, d, 4), 2.0, "relu")]
    wide = [("b", *_weights(16, k, d, 5), 0.5, "gelu"), ("c", *_weights(9, k, d, 6), 1.0, "silu")]
    stacks = {8: stack_adapters(small, r_max=8), 16: stack_adapters(wide, r_max=16)}
    rows = [(16, 1), None, (8, 0), (16, 0), (16, 1)]
    acts = {(8, 0): "relu", (16, 0): "gelu", (16, 1): "silu"}
    segments = plan_segments(rows, acts)
    assert [s.row_index.tolist() for s in segments] == [[1, -1, -1, 0, 1], [-1, -1, 0, -1, -1]]
    x = torch.randn(5, 3, k, dtype=D64)
    out = torch.zeros(5, 3, d, dtype=D64)
    reference.segmented_add_(out, x, stacks, segments)
    by_slot = {(8, 0): small[0], (16, 0): wide[0], (16, 1): wide[1]}
    for row, slot in enumerate(rows):
        want = torch.zeros(3, d, dtype=D64) if slot is None else eq2(x[row], *by_slot[slot][1:])
        torch.testing.assert_close(out[row], want, rtol=1e-12, atol=1e-12)
