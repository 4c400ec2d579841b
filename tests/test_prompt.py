"""The prompt rule set (``nora_peft.prompt``): training, evaluation and serving build byte-identical prompts, and the
EOS and pad rules."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from nora_peft.prompt import PLAIN_TEMPLATE, eos_ids, format_chat, format_prompt, pad_id
from tests.serve.conftest import make_tokenizer
from tests.tiny_models import tiny_causal_lm

pytest.importorskip("datasets")
pytest.importorskip("fastapi")

RECORD = {"id": "r0", "prompt": "the big cat sat on the mat", "response": "one two", "answer": None}
# a small ChatML-like template: its own start tokens, so no BOS goes in front
TEMPLATE = (
    "{% for m in messages %}[BOS]{{ m['role'] }} {{ m['content'] }}[EOS]{% endfor %}"
    "{% if add_generation_prompt %}[BOS]assistant {% endif %}"
)


def _tokenizer(chat_template: str | None):
    """The test tokenizer, adding BOS itself like Llama's (so a template's own BOS must not get a second one)."""
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tok.chat_template = chat_template
    return tok


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["plain", "chat-template"])
def test_training_evaluation_and_serving_build_the_same_prompt(template):
    from nora_peft.lab.data.formatting import build_lm_dataset, format_example
    from nora_peft.lab.eval.generation import prompt_ids
    from nora_peft.serve import Engine, ServeConfig
    from nora_peft.serve.admission import Admission

    tok = _tokenizer(template)
    train_text, _ = format_example(tok, RECORD)
    dataset, _ = build_lm_dataset([RECORD], tok, max_length=64)
    train_ids = dataset["input_ids"][0][: dataset["labels"][0].count(-100)]
    eval_ids = prompt_ids(tok, [RECORD])[0]

    engine = Engine(tiny_causal_lm("llama", dtype=torch.float32), tok, ServeConfig(base_name="base"))
    admission = Admission(engine)
    messages = admission.chat_messages(SimpleNamespace(messages=[_user(RECORD["prompt"])]))
    serve_text = format_chat(tok, messages)
    serve_ids = asyncio.run(admission.encode_chat(messages))

    assert serve_text.encode() == train_text.encode()
    assert train_ids == eval_ids == serve_ids
    if template is None:  # the plain template, BOS once in front
        assert train_text == PLAIN_TEMPLATE.format(prompt=RECORD["prompt"])
        assert serve_ids[0] == tok.bos_token_id and serve_ids[1] != tok.bos_token_id
    else:  # the template writes its own start tokens
        assert train_text.startswith("[BOS]user the big cat") and train_text.endswith("[BOS]assistant ")
        assert serve_ids.count(tok.bos_token_id) == 2


def _user(text: str):
    return SimpleNamespace(role="user", content=text)


def test_format_chat_plain_turns():
    tok = _tokenizer(None)
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    expected = "be brief\n\n" + PLAIN_TEMPLATE.format(prompt="one") + "two\n\n" + PLAIN_TEMPLATE.format(prompt="three")
    assert format_chat(tok, chat) == expected
    assert format_prompt(tok, "one") == PLAIN_TEMPLATE.format(prompt="one")


def test_pad_id_is_one_rule():
    assert pad_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2  # evaluation's fallback, now everyone's
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_eos_ids_prefer_the_generation_config():
    tok = SimpleNamespace(eos_token_id=2)
    several = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9]))
    assert eos_ids(several, tok) == [7, 9]
    assert eos_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tok) == [2]
    assert eos_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == []
