"""Formatting: the plain template, labels -100 exactly on the prompt, truncation/drop counts, answers."""

from __future__ import annotations

import pytest

from nora_peft.bases.embedded import build_tokenizer, pretraining_corpus
from nora_peft.lab.data import (
    PLAIN_TEMPLATE,
    answer_is_complete,
    answers_match,
    build_lm_dataset,
    extract_answer,
    format_prompt,
)


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


def _chat_tokenizer(tokenizer):
    """The test tokenizer with a chat template that, like SmolLM2's, writes its own start token (here BOS) and ends
    a turn with the eos token."""
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    chat.chat_template = (
        "{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return chat


def _check_chat_labels(tokenizer, record):
    """Labels of a chat-template example against an independent rendering of the whole conversation."""
    ds, _ = build_lm_dataset([record], tokenizer, max_length=4096)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}],
        tokenize=False,
    )
    # the example is the rendered conversation up to and including the reply's end-of-turn (eos) token; tokenizing
    # prompt and response apart gives the same ids as tokenizing it in one piece
    assert rendered.startswith(tokenizer.decode(ids)) and rendered[len(tokenizer.decode(ids)) :].strip() == ""
    assert ids == tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
    # one BOS, the template's own (no second one added in front)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    n_prompt = labels.count(-100)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert tokenizer.decode(ids[:n_prompt]) == format_prompt(tokenizer, record["prompt"])
    assert tokenizer.decode(labels[n_prompt:]) == record["response"] + tokenizer.eos_token
    assert labels[-1] == tokenizer.eos_token_id and labels[n_prompt:] == ids[n_prompt:]


def test_chat_template_labels_the_reply_and_its_end_of_turn_only(tokenizer):
    chat = _chat_tokenizer(tokenizer)
    assert format_prompt(chat, "hi") == "<s>user\nhi</s>\n<s>assistant\n"
    _check_chat_labels(chat, {"id": "a", "prompt": "What is 2 plus 3?", "response": "2 + 3 = 5\n#### 5"})
    plain, _ = build_lm_dataset([{"id": "a", "prompt": "hi", "response": "ok"}], tokenizer, max_length=64)
    assert plain[0]["input_ids"][0] == tokenizer.bos_token_id  # the plain template gets BOS in front


def test_smollm2_chat_template_labels(smollm2_path, gsm8k_dir):
    """The real model's template: ``<|im_start|>`` (its BOS) starts every turn, ``<|im_end|>`` (its eos) ends them."""
    from transformers import AutoTokenizer

    from nora_peft.lab.data import load_source

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    record = load_source("gsm8k", path=str(gsm8k_dir))["test"][0]
    _check_chat_labels(tok, record)
    ds, _ = build_lm_dataset([record], tok, max_length=4096)
    assert ds[0]["input_ids"][0] == tok.bos_token_id and tok.decode(ds[0]["input_ids"][:3]).startswith(
        "<|im_start|>system"
    )


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so #### 1,234", "1234"),
        ("#### $1,234.50.", "1234.5"),
        ("Total: $5 each\n#### -12", "-12"),
        ("#### \u22127", "-7"),  # unicode minus
        ("#### - 3", "-3"),
        ("#### 0.50", "0.5"),
        ("#### .5", "0.5"),
        ("#### 18 dollars", "18"),
        ("#### Answer: $42", "42"),
        ("#### 3\nsecond try\n#### 4.", "4"),  # the last line wins
        ("The answer is 18.", "18"),
        ("The answer is 0.6190.", "0.619"),
        ("The final answer is $7,000.00", "7000"),
        ("The answer is -7", "-7"),
        ("#### 5\nThe answer is 6.", "5"),  # the #### line beats "The answer is"
        ("####\n", None),
        ("no answer", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("final", ["#### 1,234.50", "#### -7", "#### $18", "#### 0.25", "#### 1,000,000"])
@pytest.mark.parametrize("after", ["\n", " dollars", ".\n", ". Done", "<"])
def test_answer_is_complete_never_cuts_the_number(final, after):
    """Character by character (tokens are at least one character): not complete while the number can still grow, and
    complete once something that cannot continue it follows; what is read then is the whole number."""
    text = "Work: 3 * 4 = 12.\n" + final + after
    start = text.index("####")
    number_end = start + len(final) + (after[0] in ".,")  # a "." may still be a decimal point
    for end in range(start, number_end + 1):
        assert not answer_is_complete(text[:end]), text[:end]
    assert answer_is_complete(text) and extract_answer(text) == extract_answer(final + "\n")
    assert answers_match(extract_answer(text), final.removeprefix("#### "))


def test_answers_match():
    assert answers_match("18.0", "18") and answers_match("$1,000", "1000") and not answers_match("17", "18")
    assert answers_match("1234.5", "$1,234.50.") and answers_match("\u22127", "-7")
    assert not answers_match(None, "1")
    assert extract_answer("we get 42 apples", last_number_fallback=True) == "42"
