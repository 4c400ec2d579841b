"""How a prompt becomes text and token ids, the same way for training, evaluation and serving.

One rule set, used by the lab's data formatting and by the server alike (the core imports neither), so an adapter
is served exactly as it was trained:

* a tokenizer with a chat template formats a user turn with it; one without uses :data:`PLAIN_TEMPLATE`;
* text formatted with the plain template starts with the tokenizer's BOS token (when it has one), added once.
"""

from __future__ import annotations

from typing import Any

#: Used when the tokenizer has no chat template (the embedded default base has none).
PLAIN_TEMPLATE = "### Question:\n{prompt}\n\n### Answer:\n"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer formats chats itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text up to where the response starts: the chat template if the tokenizer has one, else
    :data:`PLAIN_TEMPLATE`."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def adds_bos(tokenizer: Any) -> bool:
    """The BOS rule: prompts start with BOS when the tokenizer has one and no chat template (the template has its
    own start tokens)."""
    return getattr(tokenizer, "bos_token_id", None) is not None and not has_chat_template(tokenizer)


def with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` with the tokenizer's BOS in front when :func:`adds_bos` says so and it is not there already."""
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        return [tokenizer.bos_token_id, *ids]
    return list(ids)
