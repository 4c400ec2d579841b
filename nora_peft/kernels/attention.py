"""Decode attention for grouped-query models: the query heads of a KV group read their keys once.

transformers' ``sdpa`` attention repeats every key and value head ``heads / kv_heads`` times (``repeat_kv``: a copy of
the whole KV cache per layer per step) whenever an attention mask is present, which it always is for a batch of
rows with different lengths, i.e. in every server batch. At one new token per row the repeat is avoidable: the
``group`` query heads that share a KV head are a ``group``-long query *sequence* against that head's keys, and the
row's padding mask (one mask row, the same for each of them) broadcasts over it. So::

    query (B, H, 1, D) -> (B, H_kv, group, D);  SDPA against key/value (B, H_kv, L, D);  -> (B, 1, H, D)

is exactly the same attention, without the copy and with a third of the K/V reads (smollm2-135m: 9 query, 3 KV heads;
one layer at batch 8 and 120 cached tokens: 125 us instead of 869 us on one CPU core). Prefill (more than one query
token), dropout, softcapping, position biases and paged caches go to transformers' own ``sdpa_attention_forward``.

:func:`use_folded_decode_attention` switches a loaded model to it (under the name :data:`ATTENTION`), registering the
function and sdpa's mask function with transformers' ``AttentionInterface`` / ``AttentionMaskInterface``;
:func:`folded_decode_attention` does it for one block and switches back (``nora eval``'s batched generation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the attention implementation name registered with transformers
ATTENTION = "nora_folded_sdpa"


def folded_decode_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(B, q_len, H, D)`` output, as ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    special = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "cache", "s_aux", "sinks"))
    mask_fits = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1))
    if q_len != 1 or heads == kv_heads or heads % kv_heads or dropout or special or not mask_fits:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    group = heads // kv_heads
    folded = query.reshape(batch, kv_heads, group, dim)  # head h = g * group + j, as repeat_kv pairs them
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    # one new token sees every cached position it is not masked from: no causal mask between the folded heads
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling, is_causal=False)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`ATTENTION` known to transformers (idempotent): the function above, with sdpa's mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, folded_decode_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def use_folded_decode_attention(model: nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to :data:`ATTENTION`; returns whether it did. Other implementations (eager,
    flash attention, ...) are left alone, as are models without grouped KV heads (nothing to fold)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or heads == kv_heads:
        return False
    register()
    model.set_attn_implementation(ATTENTION)
    return True


@contextmanager
def folded_decode_attention(model: nn.Module) -> Iterator[bool]:
    """:func:`use_folded_decode_attention` for the duration of a block (e.g. a batch of generations), then the
    model's own implementation again; yields whether it switched."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switched = use_folded_decode_attention(model)
    try:
        yield switched
    finally:
        if switched:
            model.set_attn_implementation(before)
