"""NoraConfig: documented defaults, validation with messages that name the field and the fix, JSON round trip."""

from __future__ import annotations

import pytest

from nora_peft import NoraConfig
from nora_peft.tuner.config import compute_scaling


def test_defaults_and_peft_type():
    cfg = NoraConfig()
    assert (cfg.r, cfg.activation, cfg.granularity, cfg.scaling, cfg.dropout) == (8, "silu", "weight", "alpha/r", 0.0)
    assert cfg.peft_type == "NORA" and cfg.init_weights is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r must be a positive integer"),
        ({"r": -3}, r"r must be a positive integer"),
        ({"r": 2.5}, r"r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"activation": "swish"}, r"activation must be one of .*'silu'"),
        ({"granularity": "layer"}, r"granularity must be one of .*'module'"),
        ({"scaling": "alpha"}, r"scaling must be one of .*'rslora'"),
        ({"scaling": float("nan")}, r"scaling must be one of"),
        ({"alpha": float("inf")}, r"alpha must be a finite number"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, r"layers_to_transform"),
        ({"layers_pattern": "layers"}, r"`layers_to_transform` must also be specified"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoraConfig(**kwargs)


def test_scaling_rules():
    assert compute_scaling("alpha/r", 16, 4) == 4.0
    assert compute_scaling("rslora", 16, 4) == 8.0
    assert compute_scaling(0.5, 16, 4) == 0.5


def test_json_round_trip(tmp_path):
    cfg = NoraConfig(
        r=16,
        alpha=32,
        dropout=0.1,
        activation="gelu",
        granularity="module",
        scaling="rslora",
        target_modules=["self_attn", "mlp"],
        rank_pattern={"mlp": 4},
    )
    cfg.save_pretrained(tmp_path)
    from peft import PeftConfig

    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, NoraConfig)
    for field in ("r", "alpha", "dropout", "activation", "granularity", "scaling", "target_modules", "rank_pattern"):
        assert getattr(loaded, field) == getattr(cfg, field), field


def test_activation_and_granularity_are_literal_types_matching_the_ops():
    from typing import get_args, get_type_hints

    from nora_peft.tuner.config import Activation, Granularity
    from nora_peft.tuner.ops import ACTIVATIONS

    hints = get_type_hints(NoraConfig)
    assert hints["activation"] is Activation and hints["granularity"] is Granularity
    assert get_args(Activation) == ACTIVATIONS and get_args(Granularity) == ("weight", "module")
    for name in ("activation", "granularity"):  # peft-style docs: the field's Literal type in `Args:`
        assert f"{name} (`Literal[" in NoraConfig.__doc__
