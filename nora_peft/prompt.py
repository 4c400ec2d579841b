"""How a prompt becomes text and token ids, the same way for training, evaluation and serving.

One rule set, used by the lab's data formatting and evaluation and by the server alike (the core imports neither),
so an adapter is served exactly as it was trained:

* a tokenizer with a chat template formats a chat with it; one without uses :data:`PLAIN_TEMPLATE` per user turn
  (:func:`format_chat`; :func:`format_prompt` is the one-user-turn case training uses);
* text formatted with the plain template starts with the tokenizer's BOS token (when it has one), added once
  (:func:`adds_bos`, :func:`with_bos`, :func:`encode_prompt`);
* a reply ends at any of :func:`eos_ids`; padded positions hold :func:`pad_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Used when the tokenizer has no chat template (the embedded default base has none).
PLAIN_TEMPLATE = "### Question:\n{prompt}\n\n### Answer:\n"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer formats chats itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text of a chat up to where the assistant's reply starts.

    With a chat template: the template (with the generation prompt). Without: :data:`PLAIN_TEMPLATE` around each user
    (or tool) turn, and system / developer text and earlier assistant replies as plain paragraphs. ``messages`` are
    ``{"role", "content"}`` dicts with text content.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    parts = []
    for m in messages:
        if m["role"] in ("user", "tool"):
            parts.append(PLAIN_TEMPLATE.format(prompt=m["content"]))
        else:  # system / developer / assistant
            parts.append(m["content"] + "\n\n")
    return "".join(parts)


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text up to where the response starts for one user turn: :func:`format_chat` of ``[user: prompt]``."""
    return format_chat(tokenizer, [{"role": "user", "content": prompt}])


def adds_bos(tokenizer: Any) -> bool:
    """The BOS rule: prompts start with BOS when the tokenizer has one and no chat template (the template has its
    own start tokens)."""
    return getattr(tokenizer, "bos_token_id", None) is not None and not has_chat_template(tokenizer)


def with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """``ids`` with the tokenizer's BOS in front when :func:`adds_bos` says so and it is not there already."""
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        return [tokenizer.bos_token_id, *ids]
    return list(ids)


def encode_prompt(tokenizer: Any, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a prompt: the tokenizer's ids, then the BOS rule. Formatted text (:func:`format_chat`) is encoded
    without the tokenizer's own special tokens, as training encodes it (the template writes its own)."""
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a reply: the model's generation config's (one or several), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def pad_id(tokenizer: Any) -> int:
    """The id padded positions hold (they are masked out, so any id works): the tokenizer's pad, else its EOS,
    else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
