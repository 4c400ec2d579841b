"""The embedded default base: a real pretrained LM, loadable with Auto classes, reproducible from a seed."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nora_peft.bases.embedded import build_base, pretraining_corpus
from nora_peft.bases.named import load_model_and_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def two_small_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    kw = dict(steps=8, batch_size=4, seq_len=64, documents=400, model_size=SMALL, progress=False)
    return (
        build_base(root / "a", seed=3, **kw),
        build_base(root / "b", seed=3, **kw),
        build_base(root / "c", seed=4, **kw),
    )


def test_same_seed_same_weights(two_small_builds):
    a, b, c = (load_file(p / "model.safetensors") for p in two_small_builds)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_loads_with_auto_classes_and_tokenizer_round_trips(two_small_builds):
    path = two_small_builds[0]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = "Ann has 12 apples. 0.512 * 0.488 = 0.2499."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(len(tok.decode([i]).strip()) == 1 for i in tok("12345", add_special_tokens=False)["input_ids"])
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.chat_template is None
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)


def test_default_base_is_a_real_language_model(default_base_path):
    model, tok = load_model_and_tokenizer(str(default_base_path))
    texts = pretraining_corpus(64, seed=12345)  # text from a seed the build never used
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < 0.5 * math.log(len(tok)), (loss, math.log(len(tok)))
