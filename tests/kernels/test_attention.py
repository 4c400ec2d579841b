"""The folded decode attention against the attention formula in float64 and against transformers' sdpa path."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from nora_peft.kernels.attention import ATTENTION, folded_decode_sdpa, use_folded_decode_attention


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _reference(query, key, value, keep):
    """softmax(q k^T / sqrt(D) masked) v per query head, KV head h // group, in float64."""
    q, k, v = query.double(), key.double(), value.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, q_len, H, D)


def test_one_token_decode_equals_the_formula_with_padding():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 4, 9, 3, 11, 16
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, :4] = False  # left padding of different widths
    keep[3, :7] = False
    out, _ = folded_decode_sdpa(_Module(), query, key, value, keep[:, None, None, :], scaling=dim**-0.5)
    assert out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out.double(), _reference(query, key, value, keep), rtol=1e-5, atol=1e-5)
    unmasked, _ = folded_decode_sdpa(_Module(), query, key, value, None, scaling=dim**-0.5)
    every = torch.ones_like(keep)
    torch.testing.assert_close(unmasked.double(), _reference(query, key, value, every), rtol=1e-5, atol=1e-5)


def test_prefill_and_non_grouped_heads_go_to_transformers_sdpa():
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 9, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    ours, _ = folded_decode_sdpa(_Module(), query, key, value, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(_Module(), query, key, value, None, scaling=0.3)
    assert torch.equal(ours, theirs)


def _tiny_gqa_model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def test_a_padded_batch_decodes_the_same_logits_as_sdpa(monkeypatch):
    """Left-padded rows of different lengths, several cached decode steps: logits as with transformers' sdpa."""
    import nora_peft.kernels.attention as attention

    folded_shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        folded_shapes.append(tuple(query.shape))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    model = _tiny_gqa_model()
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :5], mask[2, :2] = 0, 0
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        assert use_folded_decode_attention(model) and model.config._attn_implementation == ATTENTION
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    assert (3, 2, 3, 8) in folded_shapes  # the decode steps ran folded: (B, kv heads, group, head dim)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager"])
def test_other_implementations_and_plain_multi_head_models_are_left_alone(attn):
    assert not use_folded_decode_attention(_tiny_gqa_model(attn))
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    assert not use_folded_decode_attention(model) and model.config._attn_implementation == "sdpa"


def test_the_context_manager_switches_back():
    from nora_peft.kernels.attention import folded_decode_attention

    model = _tiny_gqa_model()
    with folded_decode_attention(model) as switched:
        assert switched and model.config._attn_implementation == ATTENTION
    assert model.config._attn_implementation == "sdpa"
    eager = _tiny_gqa_model("eager")
    with folded_decode_attention(eager) as switched:
        assert not switched
    assert eager.config._attn_implementation == "eager"
