"""AdapterSpec: one code path that gives NoraConfig or peft's own LoraConfig (lora / rslora / dora)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from nora_peft import NoraConfig
from nora_peft.methods import AdapterSpec, build_peft_model, count_parameters
from nora_peft.tuner.layer import NoraLayer

from .tiny_models import tiny_causal_lm


@pytest.mark.parametrize(
    ("method", "cls", "scaling"),
    [
        ("nora", NoraConfig, 16 / 4),
        ("lora", LoraConfig, 16 / 4),
        ("rslora", LoraConfig, 16 / 2),
        ("dora", LoraConfig, 16 / 4),
    ],
)
def test_each_method_builds_its_own_config_and_layers(method, cls, scaling):
    spec = AdapterSpec(method=method, r=4, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
    cfg = spec.to_peft_config()
    assert type(cfg) is cls
    model = build_peft_model(tiny_causal_lm("llama"), spec)
    layer_cls = NoraLayer if method == "nora" else LoraLayer
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    assert len(layers) == 4 and all(math.isclose(m.scaling["default"], scaling) for m in layers)
    if method != "nora":
        assert layers[0].use_dora["default"] == (method == "dora")
    counts = count_parameters(model)
    # q/v of a 32-wide model with 2 layers: r*(k+d) per layer, plus DoRA's magnitude vectors
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16)) + (2 * (32 + 16) if method == "dora" else 0)
    assert counts["trainable"] == expected


def test_same_trainable_parameters_for_nora_and_lora():
    sizes = [
        count_parameters(build_peft_model(tiny_causal_lm("llama"), AdapterSpec(method=m, r=8)))["trainable"]
        for m in ("nora", "lora", "rslora")
    ]
    assert len(set(sizes)) == 1


def test_alpha_defaults_to_twice_r_and_labels():
    assert AdapterSpec(r=64).resolved_alpha == 128
    assert AdapterSpec(method="rslora", r=16).label() == "rslora-r16"
    assert AdapterSpec(r=8, activation="relu", granularity="module").label() == "nora-r8-relu-module"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ia3"}, "Unknown adapter method"),
        ({"method": "lora", "activation": "relu"}, "NoRA options"),
        ({"method": "lora", "scaling": "rslora"}, "method='rslora'"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterSpec(**kwargs)


def test_nora_identity_equals_lora_math():
    """With the identity activation and no dropout, NoRA computes exactly LoRA's B A x (same weights)."""
    ids = torch.randint(3, 97, (2, 7))
    lora = build_peft_model(tiny_causal_lm("llama").double(), AdapterSpec(method="lora", r=4, dropout=0.0)).eval()
    nora = build_peft_model(tiny_causal_lm("llama").double(), AdapterSpec(r=4, dropout=0.0, activation="identity"))
    for m_l, m_n in zip(
        [m for m in lora.modules() if isinstance(m, LoraLayer)], [m for m in nora.modules() if isinstance(m, NoraLayer)]
    ):
        torch.nn.init.normal_(m_l.lora_B["default"].weight)
        m_n.nora_up["default"].weight.data.copy_(m_l.lora_A["default"].weight.data)
        m_n.nora_down["default"].weight.data.copy_(m_l.lora_B["default"].weight.data)
    with torch.no_grad():
        torch.testing.assert_close(nora.eval()(ids).logits, lora(ids).logits, rtol=1e-10, atol=1e-10)
