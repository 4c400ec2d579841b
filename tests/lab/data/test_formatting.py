"""Formatting: the plain template, labels -100 exactly on the prompt, truncation/drop counts, answers."""

from __future__ import annotations

import pytest

from nora_peft.lab.base import build_tokenizer, pretraining_corpus
from nora_peft.lab.data import PLAIN_TEMPLATE, answers_match, build_lm_dataset, extract_answer, format_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(pretraining_corpus(500), vocab_size=300)


def test_labels_mask_exactly_the_prompt(tokenizer):
    recs = [{"id": "a", "prompt": "What is 2 plus 3?", "response": "It is 5.", "answer": "5"}]
    ds, stats = build_lm_dataset(recs, tokenizer, max_length=64)
    row = ds[0]
    n_prompt = sum(1 for lab in row["labels"] if lab == -100)
    assert tokenizer.decode(row["input_ids"][1:n_prompt]) == PLAIN_TEMPLATE.format(prompt="What is 2 plus 3?")
    assert tokenizer.decode(row["labels"][n_prompt:]) == "It is 5." + tokenizer.eos_token
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:] and len(row["labels"]) == len(row["input_ids"])
    assert stats == {"examples": 1, "kept": 1, "truncated": 0, "dropped": 0}
    full, _ = build_lm_dataset(recs, tokenizer, max_length=64, response_only=False)
    assert -100 not in full[0]["labels"][1:]


def test_truncation_and_drops_are_counted(tokenizer):
    long_prompt = "word " * 80
    recs = [
        {"id": "fits", "prompt": "hi", "response": "ok", "answer": None},
        {"id": "cut", "prompt": "hi there", "response": "long answer " * 30, "answer": None},
        {"id": "drop", "prompt": long_prompt, "response": "x", "answer": None},
    ]
    ds, stats = build_lm_dataset(recs, tokenizer, max_length=40)
    assert stats == {"examples": 3, "kept": 2, "truncated": 1, "dropped": 1}
    assert ds["id"] == ["fits", "cut"] and all(len(x) <= 40 for x in ds["input_ids"])
    with pytest.raises(ValueError, match=r"No example fits max_length=10.*--max-length"):
        build_lm_dataset(recs[2:], tokenizer, max_length=10)


def test_chat_template_is_used_when_present(tokenizer):
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert format_prompt(tokenizer, "hello") == "<|user|>hello<|assistant|>"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so #### 1,234", "1234"),
        ("The answer is 18.", "18"),
        ("The answer is 0.6190.", "0.619"),
        ("The answer is -7", "-7"),
        ("no answer", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answers_match():
    assert answers_match("18.0", "18") and answers_match("$1,000", "1000") and not answers_match("17", "18")
    assert not answers_match(None, "1")
    assert extract_answer("we get 42 apples", last_number_fallback=True) == "42"
