"""The fused Triton kernels against the float64 formula: every activation, padded ranks, rows on no adapter (-1),
fp32 and bf16. Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before any kernel
is built); without triton the module is skipped."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit builds the kernels
pytest.importorskip("triton")

from nora_peft.kernels import reference  # noqa: E402
from nora_peft.kernels import triton as kt  # noqa: E402
from nora_peft.kernels.activations import ACTIVATIONS  # noqa: E402
from nora_peft.kernels.mixed import plan_segments, stack_adapters  # noqa: E402

from .test_reference import D64, _weights, assert_close_rel, eq2  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_one_adapter_every_activation(act, dtype):
    """r=5 is padded to the kernel's 16; k=40 is not a multiple of the k-tile."""
    k, d, r, s = 40, 20, 5, 1.3
    up, down = _weights(r, k, d, 0)
    x = torch.randn(2, 3, k, dtype=D64)
    base = torch.randn(2, 3, d, dtype=D64)
    out = base.to(DEV, dtype)
    kt.add_(out, x.to(DEV, dtype), up.to(DEV, dtype), (down.t() * s).to(DEV, dtype).contiguous(), act)
    assert_close_rel(out.cpu().double() - base.to(dtype).double(), eq2(x, up, down, s, act), dtype, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_adapter_several_tiles(dtype):
    """20 tokens (two token tiles), 150 output columns (two column tiles), r=17 (padded to 32)."""
    k, d, r = 33, 150, 17
    up, down = _weights(r, k, d, 1)
    x = torch.randn(20, k, dtype=D64)
    out = torch.zeros(20, d, dtype=dtype, device=DEV)
    kt.add_(out, x.to(DEV, dtype), up.to(DEV, dtype), down.t().to(DEV, dtype).contiguous(), "gelu")
    assert_close_rel(out.cpu(), eq2(x, up, down, 1.0, "gelu"), dtype)


def test_output_that_cannot_be_viewed_gets_a_buffer():
    k, d, r = 16, 8, 4
    up, down = _weights(r, k, d, 2)
    x = torch.randn(2, 3, k, dtype=D64)
    store = torch.zeros(3, 2, d, device=DEV)
    out = store.transpose(0, 1)  # (2, 3, d) whose rows cannot be flattened by view()
    kt.add_(out, x.to(DEV, torch.float32), up.float().to(DEV), down.t().float().contiguous().to(DEV), "silu")
    assert_close_rel(out.cpu(), eq2(x, up, down, 1.0, "silu"), torch.float32)


def _five_adapters(k, d):
    spec = [("a", 2, "silu"), ("b", 8, "relu"), ("c", 5, "identity"), ("d", 7, "gelu"), ("e", 3, "tanh")]
    return [(n, *_weights(r, k, d, 10 + i), 4.0 / r, act) for i, (n, r, act) in enumerate(spec)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kinds", ["mixed", "one"])
def test_mixed_rows_each_on_its_adapter(kinds, dtype):
    """Per-row slots over one stack (ranks padded to 8), rows on -1 untouched; one activation kind or five."""
    k, d = 24, 18
    adapters = _five_adapters(k, d)
    if kinds == "one":
        adapters = [(n, u, w, s, "silu") for n, u, w, s, _ in adapters]
    stacked = stack_adapters(adapters, dtype=dtype)
    stacked = type(stacked)(*(t.to(DEV) if torch.is_tensor(t) else t for t in vars(stacked).values()))
    index = torch.tensor([4, -1, 0, 3, 1, 2, -1, 1])
    x = torch.randn(len(index), 2, k, dtype=D64)
    base = torch.randn(len(index), 2, d, dtype=D64)
    out = base.to(DEV, dtype)
    kt.mixed_add_(out, x.to(DEV, dtype), stacked, index.to(DEV))
    got = out.cpu().double() - base.to(dtype).double()
    for row, i in enumerate(index.tolist()):
        if i < 0:
            assert torch.equal(got[row], torch.zeros_like(got[row]))
        else:
            _, up, down, s, act = adapters[i]
            assert_close_rel(got[row], eq2(x[row], up, down, s, act), dtype, base[row])


def test_segments_one_launch_per_bucket_equal_the_torch_backend():
    k, d = 24, 18
    adapters = _five_adapters(k, d)
    small = stack_adapters(adapters[:3], r_max=8)
    wide = stack_adapters(adapters[3:], r_max=16)
    stacks = {8: small, 16: wide}
    rows = [(16, 1), None, (8, 0), (16, 0), (8, 2), (8, 2)]
    acts = {(8, i): adapters[i][4] for i in range(3)} | {(16, i): adapters[3 + i][4] for i in range(2)}
    segments = plan_segments(rows, acts)
    x = torch.randn(len(rows), 3, k, dtype=D64)
    want = reference.segmented_add_(torch.zeros(len(rows), 3, d, dtype=D64), x, stacks, segments)
    f32 = {b: type(s)(s.up.float(), s.down.float(), s.kind, s.kinds, s.names) for b, s in stacks.items()}
    got = kt.segmented_add_(torch.zeros(len(rows), 3, d), x.float(), f32, segments)
    assert_close_rel(got, want, torch.float32)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_peft_model_through_the_triton_backend(monkeypatch):
    """A NoRA model forced onto the Triton backend gives the torch backend's logits, one adapter and mixed rows."""
    from peft import get_peft_model

    from nora_peft import NoraConfig
    from tests.tiny_models import input_ids, tiny_causal_lm

    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=4, alpha=8, init_weights=False), "p").eval().to(DEV)
    model.add_adapter("q", NoraConfig(r=9, alpha=4, activation="tanh", init_weights=False))
    ids = input_ids().to(DEV)
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NORA_KERNELS", backend)
        with torch.no_grad():
            runs[backend] = (model(ids).logits, model(ids, adapter_names=["q", "__base__"]).logits)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        used = (q_proj.__dict__["_nora_inference_cache"][1][0], q_proj.__dict__["_nora_mixed_cache"][1][0])
        assert [b.name for b in used] == [backend, backend]
    for got, want in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(runs["torch"][0], runs["torch"][1])  # the two calls really differ


def test_served_layer_through_the_triton_backend(monkeypatch):
    """The server's stacked layer on the Triton backend: rows on two rank buckets and the base."""
    from nora_peft.serve.layers import SlotStacks

    k, d = 24, 18
    adapters = _five_adapters(k, d)
    layers = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NORA_KERNELS", backend)
        stacks = SlotStacks(DEV)
        torch.manual_seed(0)
        layer = stacks.wrap(torch.nn.Linear(k, d).to(DEV))
        for slot, (_, up, down, s, act) in enumerate(adapters):
            stacks.assign(slot, 16 if slot == 3 else up.shape[0], act)  # slot 3 goes to the 16 bucket
            layer.set_slot(slot, up.float(), down.float(), s)
        x = torch.randn(6, 2, k, device=DEV)
        with torch.no_grad(), stacks.use(stacks.mapping([3, -1, 0, 4, 3, 1])):
            layers[backend] = (layer(x), layer.backend().name)
    assert layers["triton"][1] == "triton" and layers["torch"][1] == "torch"
    torch.testing.assert_close(layers["triton"][0], layers["torch"][0], rtol=1e-5, atol=1e-5)
