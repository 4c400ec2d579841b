"""The layers' two paths: inference (no autograd function, cached compute-dtype weights with the scaling folded in,
added into the base output in place) and autograd; the cache follows every change; the shared layer base."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

from nora_peft import NoraConfig
from nora_peft.tuner import layer as layer_mod
from nora_peft.tuner.layer import Linear, NoraModule, ParallelBlock

from ..tiny_models import MLP, input_ids, tiny_causal_lm
from .test_model import REF_ACTS, nora, reference_logits

D64 = torch.float64


@pytest.fixture
def count_autograd(monkeypatch):
    """How many times the layers called the training autograd function."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = layer_mod.nora_delta
    monkeypatch.setattr(layer_mod, "nora_delta", counted)
    return calls


def _mlp(**kw) -> nn.Module:
    return get_peft_model(MLP().double(), nora(target_modules=["lin0", "lin1"], **kw)).eval()


@pytest.mark.parametrize("activation", list(REF_ACTS))
def test_inference_path_is_eq2_without_autograd_and_in_place(activation, count_autograd):
    model = _mlp(activation=activation)
    lin0 = model.base_model.model.lin0
    linear = lin0.base_layer.forward
    seen = []
    lin0.base_layer.forward = lambda x: seen.append(linear(x)) or seen[-1]  # not a hook: hooks turn in-place off
    x = torch.randn(5, 10, dtype=D64)
    with torch.no_grad():
        out = model(x)
        assert lin0(x) is seen[-1]  # the branch was added into the base output itself
    assert count_autograd == []
    torch.testing.assert_close(out, reference_logits(model, x), rtol=1e-10, atol=1e-10)
    down_t = lin0.__dict__["_nora_inference_cache"][1][1][0][1]
    torch.testing.assert_close(down_t, lin0.nora_down["default"].weight.t() * lin0.scaling["default"])  # s folded


def test_gradients_and_dropout_take_the_autograd_function(count_autograd):
    model = _mlp(dropout=0.5)
    x = torch.randn(5, 10, dtype=D64)
    model(x).sum().backward()  # eval mode, but the adapter weights need gradients
    assert len(count_autograd) == 2
    up = model.base_model.model.lin0.nora_up["default"].weight
    assert up.grad is not None and up.grad.abs().sum() > 0
    model.train()
    with torch.no_grad():  # no gradient, but training-mode dropout still applies
        first, second = model(x), model(x)
    assert len(count_autograd) == 6 and not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(count_autograd) == 6


def test_cache_follows_weights_scalings_adapters_and_dtype():
    model = _mlp()
    model.add_adapter("other", nora(target_modules=["lin0", "lin1"], activation="tanh"))
    lin0 = model.base_model.model.lin0
    x = torch.randn(5, 10, dtype=D64)

    def check(adapter="default"):
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out, reference_logits(model, x, adapter), rtol=1e-10, atol=1e-10)
        return out

    first = check()
    with torch.no_grad():
        lin0.nora_down["default"].weight.mul_(3.0)  # in place: only the version counter changes
    assert not torch.allclose(check(), first)
    model.set_adapter("other")
    check("other")
    model.set_adapter("default")
    lin0.scaling["default"] = lin0.scaling["default"] * 2
    with torch.no_grad():
        doubled = model(x)
    lin0.scaling["default"] = lin0.scaling["default"] / 2
    assert not torch.allclose(doubled, check())
    model.float()  # a new dtype: the cached weights are rebuilt in it
    with torch.no_grad():
        out = model(x.float())
    assert lin0.__dict__["_nora_inference_cache"][1][1][0][0].dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_logits(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_each_dtype_within_its_tolerance_of_float64(dtype, tol):
    """One adapted linear in ``dtype`` (fp32 adapter weights): the added branch against float64 Eq. 2."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 48)).to(dtype), nora(r=8, target_modules=["0"])).eval()
    layer = model.base_model.model[0]
    x = torch.randn(3, 7, 64).to(dtype)
    with torch.no_grad():
        base = layer.base_layer(x).double()
        delta = layer(x).double() - base
    up, down = layer.nora_up["default"].weight.double(), layer.nora_down["default"].weight.double()
    want = REF_ACTS["silu"](x.double() @ up.t()) @ down.t() * layer.scaling["default"]
    err = (delta - want).abs().max() / max(want.abs().max(), base.abs().max())
    assert err <= tol, f"{dtype}: relative error {float(err):.1e}"


def test_parallel_block_and_linear_share_a_base_not_each_other():
    assert issubclass(Linear, NoraModule) and issubclass(ParallelBlock, NoraModule)
    assert not issubclass(ParallelBlock, Linear) and not hasattr(ParallelBlock, "get_delta_weight")
    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=4, granularity="module", init_weights=False))
    with pytest.raises(ValueError, match="granularity='module'"):
        model.merge_and_unload()
    with torch.no_grad():  # a block returning a tuple: the branch goes into its first element, in place
        assert torch.isfinite(model(input_ids()).logits).all()


def test_a_hook_on_the_base_layer_keeps_the_base_output():
    """A forward hook that keeps the base layer's output (analysis does) sees the base output, not the sum."""
    model = _mlp()
    lin0 = model.base_model.model.lin0
    seen = []
    lin0.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    x = torch.randn(5, 10, dtype=D64)
    with torch.no_grad():
        full = lin0(x)
        torch.testing.assert_close(seen[0], lin0.base_layer(x), rtol=0, atol=0)
    assert full is not seen[0] and not torch.allclose(full, seen[0])


def test_a_global_forward_hook_keeps_the_base_output():
    """A hook registered for every module (``register_module_forward_hook``) also sees the base layer's output: the
    branch must not be added into it in place."""
    model = _mlp()
    lin0 = model.base_model.model.lin0
    seen = []

    def keep(mod, args, out):
        if mod is lin0.base_layer:
            seen.append(out)

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        x = torch.randn(5, 10, dtype=D64)
        with torch.no_grad():
            full = lin0(x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], lin0.base_layer(x), rtol=0, atol=0)
    assert not torch.allclose(full, seen[0])
