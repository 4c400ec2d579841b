"""Static-cache greedy decode equals ``generate``'s greedy output token for token (plain, NoRA and LoRA models)."""

from __future__ import annotations

import pytest
import torch

from nora_peft.kernels.decode import StaticDecoder, greedy_decode
from nora_peft.methods import AdapterSpec, build_peft_model
from tests.tiny_models import VOCAB, input_ids, tiny_causal_lm

NEW = 10


def left_padded(batch: int = 3, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths, left-padded with 0 (row i has i pads)."""
    ids = input_ids(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    for row in range(batch):
        ids[row, :row] = 0
        mask[row, :row] = 0
    return ids, mask


def reference(model, ids, mask, new=NEW, eos=None, pad=0, min_new=None):
    kwargs = {"eos_token_id": eos} if eos is not None else {"min_new_tokens": new}
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad, **kwargs
        )


def a_stop_token(model, ids, mask) -> int:
    """A token that row 0 emits mid-way and other rows emit later or never: a real per-row stop to test."""
    seq = reference(model, ids, mask)[:, ids.shape[1] :]
    for tok in seq[0, 1:-1].tolist():
        first = [(row == tok).nonzero()[0].item() if (row == tok).any() else NEW for row in seq]
        if len(set(first)) > 1 and tok != 0:
            return tok
    pytest.fail("no token stops the rows at different steps; choose another seed")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_static_decode_equals_generate_with_padding_and_per_row_stop(arch):
    model = tiny_causal_lm(arch)
    ids, mask = left_padded()
    want = reference(model, ids, mask)
    got = greedy_decode(model, ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, want)
    eos = a_stop_token(model, ids, mask)
    want = reference(model, ids, mask, eos=eos)
    got = greedy_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want), (got, want)
    stops = [(row == eos).nonzero() for row in got[:, ids.shape[1] :]]
    assert len({int(s[0]) if len(s) else -1 for s in stops}) > 1  # the rows did stop at different steps
    # every stopped row was padded after its stop token, as generate does
    for row, s in zip(got[:, ids.shape[1] :], stops):
        if len(s):
            assert (row[int(s[0]) + 1 :] == 0).all()


def test_eager_attention_takes_the_additive_mask():
    model = tiny_causal_lm("llama")
    model.set_attn_implementation("eager")
    ids, mask = left_padded()
    assert torch.equal(greedy_decode(model, ids, mask, max_new_tokens=NEW), reference(model, ids, mask))


def _adapted(method: str, merged: bool, activation: str = "silu"):
    base = tiny_causal_lm("llama")
    extra = {"init_weights": False} if method == "nora" else {"init_lora_weights": False}
    spec = AdapterSpec(method=method, r=4, target_modules=["q_proj", "v_proj"], activation=activation, extra=extra)
    torch.manual_seed(0)
    model = build_peft_model(base, spec).eval()
    return model.merge_and_unload() if merged else model


@pytest.mark.parametrize(
    "method,merged,activation",
    [("nora", False, "silu"), ("nora", True, "identity"), ("nora", False, "identity"), ("lora", False, "silu"),
     ("lora", True, "silu")],
)  # fmt: skip
def test_adapted_models_merged_and_unmerged_decode_as_generate(method, merged, activation):
    model = _adapted(method, merged, activation)
    ids, mask = left_padded()
    want = reference(model, ids, mask)
    assert torch.equal(greedy_decode(model, ids, mask, max_new_tokens=NEW), want)
    with torch.no_grad():  # the adapter changes what is decoded (a test that could not fail otherwise)
        plain = reference(tiny_causal_lm("llama"), ids, mask)
    assert not torch.equal(plain, want)


def test_a_decoder_is_reused_across_prompts_and_batches_of_its_size():
    model = tiny_causal_lm("llama")
    decoder = StaticDecoder(model, batch_size=3, max_cache_len=32, graph=False)
    for seed, length in ((1, 7), (2, 12), (1, 7)):
        ids, mask = left_padded(length=length, seed=seed)
        got = decoder.generate(ids, mask, max_new_tokens=NEW)
        assert torch.equal(got, reference(model, ids, mask))
    one = input_ids(3, 5, seed=4)
    assert torch.equal(decoder.generate(one, max_new_tokens=4), reference(model, one, torch.ones_like(one), new=4))


def test_a_smaller_batch_reuses_the_decoder_and_its_rows_still_stop_on_their_own():
    model = tiny_causal_lm("llama")
    decoder = StaticDecoder(model, batch_size=4, max_cache_len=32, graph=False)
    ids, mask = left_padded(batch=3)
    eos = a_stop_token(model, ids, mask)
    for rows in (3, 2, 1):
        want = reference(model, ids[-rows:], mask[-rows:], eos=eos)
        got = decoder.generate(ids[-rows:], mask[-rows:], max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, want), rows


def test_stops_on_any_of_several_eos_ids_and_decodes_exactly_n_without_eos():
    model = tiny_causal_lm("llama")
    ids, mask = left_padded()
    free = greedy_decode(model, ids, mask, max_new_tokens=NEW)
    assert free.shape[1] == ids.shape[1] + NEW
    eos = [a_stop_token(model, ids, mask), VOCAB - 1]
    want = reference(model, ids, mask, eos=eos)
    assert torch.equal(greedy_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0), want)


def test_bad_input_names_the_problem_and_the_fix():
    model = tiny_causal_lm("llama")
    decoder = StaticDecoder(model, batch_size=2, max_cache_len=12, graph=False)
    ids = input_ids(2, 8)
    with pytest.raises(ValueError, match="built for batch_size=2, got 3 rows"):
        decoder.generate(input_ids(3, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds max_cache_len=12; build the decoder with a larger"):
        decoder.generate(ids, max_new_tokens=5)
    with pytest.raises(ValueError, match="at least one 1 per row"):
        decoder.generate(ids, torch.zeros_like(ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.generate(ids, max_new_tokens=2, eos_token_id=VOCAB)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StaticDecoder(model, batch_size=1, max_cache_len=8, graph=True)
    with pytest.raises(ValueError, match="sliding-window layers"):
        StaticDecoder(tiny_causal_lm("mistral", sliding_window=4), batch_size=1, max_cache_len=8, graph=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_generate_and_replays_across_calls():
    model = _adapted("nora", False).cuda()
    decoder = StaticDecoder(model, batch_size=3, max_cache_len=32)
    assert decoder.graph
    for seed in (1, 2):
        ids, mask = (t.cuda() for t in left_padded(seed=seed))
        eos = a_stop_token(model, ids, mask)
        got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, reference(model, ids, mask, eos=eos))
    captured = decoder._captured
    assert captured is not None
    got = decoder.generate(ids[1:], mask[1:], max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, reference(model, ids[1:], mask[1:], eos=eos)) and decoder._captured is captured


def test_a_head_padded_past_the_config_vocabulary_decodes_its_extra_ids():
    """Some checkpoints pad the embeddings past ``config.vocab_size``; an argmax there must not index out of range."""
    model = tiny_causal_lm("llama")
    model.resize_token_embeddings(VOCAB + 7)
    model.config.vocab_size = VOCAB  # as such a checkpoint's config says
    with torch.no_grad():
        model.lm_head.weight[VOCAB + 3] = 10 * model.lm_head.weight[:VOCAB].std() * torch.randn(32)  # often the argmax
    ids, mask = left_padded()
    got = greedy_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=VOCAB + 3, pad_token_id=0)
    assert (got == VOCAB + 3).any()
    assert torch.equal(got, reference(model, ids, mask, eos=VOCAB + 3))
