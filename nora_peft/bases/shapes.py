"""Named benchmark shapes: ``--model shape:NAME`` builds a random-init model of a real model's architecture.

Speed and memory depend on a model's shape, not on its weights, so a benchmark at Llama-3-8B's width needs no
download: the model is created on the ``meta`` device (no memory, no init), moved to the target device with
``to_empty`` and only then initialized there (normal(0, 0.02) linears and embeddings, unit norms, rotary tables
recomputed), so an 8B model is built on a GPU in about a second, in bf16 by default.

| name | architecture | parameters |
|---|---|---|
| ``llama-3-8b`` | Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256 | 8,030,261,248 |
| ``llama-3-1b`` | Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, 32 / 8 heads, tied embeddings | 1,235,814,400 |
| ``smollm2-135m`` | SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 / 3 heads, vocab 49152, tied | 134,515,008 |
| ``tiny`` | 2 layers, hidden 64, 4 / 2 heads, vocab 256 (tests and dry runs) | 106,816 |

Rope scaling (Llama 3.2's long-context factors) is left out: it changes the rotary table, not the cost. Token ids
0/1/2 are pad/bos/eos. Only the core and transformers are imported, inside the functions.
"""

from __future__ import annotations

from typing import Any

#: the prefix that selects a shape wherever ``--model`` is accepted by the benchmarks
SHAPE_PREFIX = "shape:"

_COMMON: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, hidden_act="silu")

#: shape name -> LlamaConfig fields
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "llama-3-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}


def is_shape(name: str | None) -> bool:
    """Whether ``name`` selects a benchmark shape (``shape:NAME``)."""
    return bool(name) and str(name).startswith(SHAPE_PREFIX)


def shape_name(name: str) -> str:
    """``shape:NAME`` or ``NAME`` -> ``NAME``, checked against :data:`SHAPES`."""
    key = name.removeprefix(SHAPE_PREFIX)
    if key not in SHAPES:
        raise ValueError(
            f"unknown benchmark shape {key!r}; choose one of {', '.join(SHAPE_PREFIX + s for s in SHAPES)}"
        )
    return key


def shape_config(name: str) -> Any:
    """The ``LlamaConfig`` of shape ``name`` (``shape:`` prefix optional)."""
    from transformers import LlamaConfig

    return LlamaConfig(**_COMMON, **SHAPES[shape_name(name)])


def _meta_model(config: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parameter_count(name: str) -> int:
    """Parameters of shape ``name`` (tied embeddings counted once), from a meta-device model: no memory used."""
    model = _meta_model(shape_config(name), None)
    return sum(p.numel() for p in model.parameters())


def _initialize(model: Any, config: Any, device: Any) -> None:
    """Initialize every parameter and buffer of a model that ``to_empty`` left as uninitialized memory."""
    import torch
    import torch.nn as nn

    std = config.initializer_range
    with torch.no_grad():
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child).__name__.endswith("RotaryEmbedding"):  # buffers only: rebuild from the config
                    setattr(parent, child_name, type(child)(config=config).to(device))
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif "Norm" in type(module).__name__:
                module.weight.fill_(1.0)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"no initializer for {type(module).__name__} in a benchmark shape")
    model.tie_weights()


def build_shape(name: str, device: Any = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A random-init causal LM of shape ``name`` on ``device`` in ``dtype`` (default bf16), in eval mode.

    Built on the meta device, moved with ``to_empty`` and initialized in place on ``device`` (see the module
    docstring); the same ``seed`` gives the same weights on the same device.
    """
    import torch

    dtype = dtype or torch.bfloat16
    config = shape_config(name)
    model = _meta_model(config, dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    _initialize(model, config, torch.device(device))
    return model.eval()
