"""The gathered mixed-adapter pass equals each adapter alone, row by row (float64, independent references)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from nora_peft.kernels.mixed import mixed_delta, stack_adapters
from nora_peft.methods import AdapterSpec, build_peft_model
from nora_peft.tuner.ops import nora_delta_reference
from tests.tiny_models import input_ids, mixed_and_alone_logits, tiny_causal_lm

D64 = torch.float64


def _random_adapters(k: int, d: int) -> list[tuple[str, torch.Tensor, torch.Tensor, float, str]]:
    g = torch.Generator().manual_seed(3)
    spec = [("a", 2, "silu"), ("b", 8, "relu"), ("c", 5, "identity"), ("d", 8, "gelu"), ("e", 3, "tanh")]
    return [
        (n, torch.randn(r, k, generator=g, dtype=D64), torch.randn(d, r, generator=g, dtype=D64), 16.0 / r, act)
        for n, r, act in spec
    ]


# (B, T, k) and (B, k)
@pytest.mark.parametrize("shape", [(9, 4), (9,), (3,), (3, 2)])
def test_mixed_delta_matches_each_adapter_alone(shape):
    k, d = 12, 7
    adapters = _random_adapters(k, d)
    # LoRA: peft's formula B(A x) * lora_alpha / r, stacked as the identity activation with its scaling
    g = torch.Generator().manual_seed(4)
    lora_a, lora_b = torch.randn(6, k, generator=g, dtype=D64), torch.randn(d, 6, generator=g, dtype=D64)
    adapters.append(("lora", lora_a, lora_b, 12 / 6, "identity"))
    stacked = stack_adapters(adapters)
    assert stacked.up.shape == (len(adapters) + 1, 8, k)
    index = torch.tensor([0, 1, 2, 3, 4, 5, -1, 1, 0])[: shape[0]] if shape[0] == 9 else torch.tensor([3, -1, 5])
    x = torch.randn(*shape, k, generator=g, dtype=D64)
    out = mixed_delta(x, stacked, index)
    assert out.shape == (*shape, d)
    for row, i in enumerate(index.tolist()):
        if i < 0:
            assert torch.equal(out[row], torch.zeros_like(out[row]))  # untouched: exactly zero delta
            continue
        name, up, down, scaling, act = adapters[i]
        if name == "lora":
            want = (x[row] @ lora_a.t() @ lora_b.t()) * scaling
        else:
            want = nora_delta_reference(x[row], up, down, scaling, act)
        torch.testing.assert_close(out[row], want, rtol=1e-12, atol=1e-12)


def test_stack_rejects_bad_input():
    k, d = 4, 3
    with pytest.raises(ValueError, match="r_max"):
        stack_adapters([("a", torch.zeros(5, k), torch.zeros(d, 5), 1.0, "silu")], r_max=4)
    with pytest.raises(ValueError, match="same layer"):
        stack_adapters(
            [
                ("a", torch.zeros(2, k), torch.zeros(d, 2), 1.0, "silu"),
                ("b", torch.zeros(2, 9), torch.zeros(d, 2), 1.0, "silu"),
            ]
        )
    with pytest.raises(ValueError, match="Unknown activation"):
        stack_adapters([("a", torch.zeros(2, k), torch.zeros(d, 2), 1.0, "swish")])
    stacked = stack_adapters([("a", torch.zeros(2, k), torch.zeros(d, 2), 1.0, "silu")])
    with pytest.raises(ValueError, match="one entry per batch row"):
        mixed_delta(torch.zeros(3, k), stacked, torch.zeros(2, dtype=torch.long))


def _three_adapter_model(granularity: str = "weight") -> PeftModel:
    base = tiny_causal_lm("llama", dtype=D64)
    targets = None if granularity == "module" else ["q_proj", "v_proj", "down_proj"]
    specs = {
        "sil": AdapterSpec(r=4, activation="silu", granularity=granularity, target_modules=targets),
        "rel": AdapterSpec(r=8, activation="relu", granularity=granularity, target_modules=targets),
        "idn": AdapterSpec(r=2, activation="identity", alpha=3.0, granularity=granularity, target_modules=targets),
    }
    model = None
    for name, spec in specs.items():
        spec.extra = {"init_weights": False}
        if model is None:
            model = build_peft_model(base, spec, adapter_name=name)
        else:
            model.add_adapter(name, spec.to_peft_config())
    return model.to(D64).eval()


@pytest.mark.parametrize("granularity", ["weight", "module"])
def test_peft_adapter_names_equal_each_adapter_alone(granularity):
    model = _three_adapter_model(granularity)
    names = ["sil", "__base__", "rel", "idn", "sil", "idn"]
    ids = input_ids(batch=len(names), length=7)
    mixed, alone = mixed_and_alone_logits(model, ids, names)
    for row, logits in enumerate(alone):
        torch.testing.assert_close(mixed[row : row + 1], logits, rtol=1e-10, atol=1e-10)
    # the rows really differ per adapter (init_weights=False), so the comparison is not vacuous
    assert not torch.allclose(mixed[0], mixed[2]) and not torch.allclose(mixed[0], mixed[1])


def test_stack_cache_follows_adapter_changes():
    model = _three_adapter_model()
    ids = input_ids(batch=2, length=5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj

    def run(names):
        with torch.no_grad():
            return model(ids, adapter_names=names).logits

    first = run(["sil", "rel"])
    stack_before = layer.__dict__["_nora_mixed_cache"][1][1]
    run(["sil", "rel"])
    assert layer.__dict__["_nora_mixed_cache"][1][1] is stack_before  # unchanged adapters: the stack is reused
    with torch.no_grad():  # an in-place weight change must invalidate the cached stack
        for m in model.modules():
            if hasattr(m, "nora_down") and "rel" in m.nora_down:
                m.nora_down["rel"].weight.mul_(2.0)
    changed = run(["sil", "rel"])
    torch.testing.assert_close(changed[0], first[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(changed[1], first[1])
    model.set_adapter("rel")
    with torch.no_grad():
        torch.testing.assert_close(changed[1:], model(ids[1:]).logits, rtol=1e-10, atol=1e-10)
    # adding and deleting adapters rebuilds the stack too
    spec = AdapterSpec(r=3, activation="tanh", target_modules=["q_proj"], extra={"init_weights": False})
    model.add_adapter("tnh", spec.to_peft_config())
    model.to(D64)
    mixed = run(["tnh", "sil"])
    model.set_adapter("tnh")
    with torch.no_grad():
        torch.testing.assert_close(mixed[:1], model(ids[:1]).logits, rtol=1e-10, atol=1e-10)
    model.set_adapter("sil")
    model.delete_adapter("rel")
    run(["sil", "idn"])
    assert layer.__dict__["_nora_mixed_cache"][1][1].names == ("sil", "idn", "tnh")
    with pytest.raises(ValueError, match="non-existing adapter"):
        run(["rel", "sil"])


def test_many_adapters_one_pass():
    """50 adapters, 50 rows: still exact (the pass has no per-adapter loop, so this is as cheap as 3)."""
    base = tiny_causal_lm("llama", dtype=D64)
    spec = AdapterSpec(r=2, target_modules=["q_proj"], extra={"init_weights": False})
    model = build_peft_model(base, spec, adapter_name="n0")
    for i in range(1, 50):
        model.add_adapter(f"n{i}", spec.to_peft_config())
    model.to(D64).eval()
    names = [f"n{i}" for i in range(50)]
    ids = input_ids(batch=50, length=4)
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for row in (0, 17, 49):
            model.set_adapter(names[row])
            torch.testing.assert_close(mixed[row : row + 1], model(ids[row : row + 1]).logits, rtol=1e-10, atol=1e-10)
