"""Benchmark shapes: the published parameter counts, and a meta-built model that is fully and sanely initialized."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nora_peft.bases.shapes import SHAPES, build_shape, is_shape, parameter_count, shape_config


@pytest.mark.parametrize(
    "name,published",
    # the model cards' counts: Llama-3-8B 8.03B, Llama-3.2-1B 1.24B (tied), SmolLM2-135M 134.5M (tied)
    [("llama-3-8b", 8_030_261_248), ("llama-3-1b", 1_235_814_400), ("smollm2-135m", 134_515_008)],
)
def test_shapes_have_the_published_parameter_counts(name, published):
    assert parameter_count(f"shape:{name}") == published


def test_tiny_is_initialized_like_a_from_config_model_and_runs_in_bf16():
    model = build_shape("shape:tiny")
    ref = AutoModelForCausalLM.from_config(shape_config("tiny"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert not any(p.is_meta for p in model.parameters())
    for (name, buf), (ref_name, ref_buf) in zip(model.named_buffers(), ref.named_buffers()):
        assert name == ref_name and torch.equal(buf, ref_buf), name  # rotary tables recomputed, not left empty
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.float().std().item() - 0.02) < 0.002 and abs(p.float().mean().item()) < 0.002, name
    ids = torch.randint(3, 256, (2, 6))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(build_shape("tiny").lm_head.weight, model.lm_head.weight)  # seeded: the same weights again
    assert not torch.equal(build_shape("tiny", seed=1).lm_head.weight, model.lm_head.weight)


def test_tied_shapes_stay_tied_and_names_are_checked():
    model = build_shape("smollm2-135m")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert is_shape("shape:tiny") and not is_shape("smollm2-135m") and not is_shape(None)
    with pytest.raises(ValueError, match=r"unknown benchmark shape 'llama-9'; choose one of shape:llama-3-8b"):
        shape_config("shape:llama-9")
    assert set(SHAPES) >= {"llama-3-8b", "llama-3-1b", "smollm2-135m", "tiny"}
