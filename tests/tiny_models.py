"""Tiny models built from configs (no downloads): Llama, Mistral, Qwen2, GPT-2 (Conv1D), Phi-3 (fused qkv), an MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 97


def _decoder_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


CONFIGS = {
    "llama": lambda: LlamaConfig(**_decoder_kwargs()),
    "mistral": lambda: MistralConfig(**_decoder_kwargs()),
    "qwen2": lambda: Qwen2Config(**_decoder_kwargs()),
    "phi3": lambda: Phi3Config(**{**_decoder_kwargs(), "num_key_value_heads": 4}),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
}

#: the linear layers each architecture adapts by default (peft's q/v mapping; GPT-2 c_attn; Phi-3 fused qkv_proj)
DEFAULT_TARGETS = {"llama": "q_proj", "mistral": "q_proj", "qwen2": "q_proj", "phi3": "qkv_proj", "gpt2": "c_attn"}
LAYER_LISTS = {"llama": "layers", "mistral": "layers", "qwen2": "layers", "phi3": "layers", "gpt2": "h"}


def tiny_causal_lm(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


class MLP(nn.Module):
    """A plain torch model: peft users adapt these too."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


def input_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def mixed_and_alone_logits(model, ids: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of one ``adapter_names=names`` forward, and of each row run alone under its own adapter (``"__base__"``:
    adapters disabled), for checking that a mixed batch equals each adapter alone."""
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        alone = []
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(ids[row : row + 1]).logits)
            else:
                model.set_adapter(name)
                alone.append(model(ids[row : row + 1]).logits)
    return mixed, alone
