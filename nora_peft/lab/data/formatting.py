"""Prompt formatting, response-only labels, deterministic splits and answer extraction.

The prompt rules (chat template or :data:`PLAIN_TEMPLATE`, and when a BOS token goes in front) live in the core,
``nora_peft.prompt``, so that the server formats a request exactly as training formatted the data.
"""

from __future__ import annotations

import random
import re
from typing import Any

from ...prompt import PLAIN_TEMPLATE, adds_bos, format_prompt, has_chat_template
from .loaders import normalize_number

__all__ = [
    "PLAIN_TEMPLATE",
    "adds_bos",
    "answer_is_complete",
    "answers_match",
    "build_lm_dataset",
    "describe_splits",
    "extract_answer",
    "format_example",
    "format_prompt",
    "has_chat_template",
    "make_splits",
    "normalize_answer",
]


def format_example(tokenizer: Any, record: dict) -> tuple[str, str]:
    """``(prompt_text, response_text)``; the response ends with the tokenizer's eos token (with a chat template that
    is the end-of-turn token the template writes after a reply, e.g. ``<|im_end|>``: what generation stops on)."""
    return format_prompt(tokenizer, record["prompt"]), record["response"] + (tokenizer.eos_token or "")


def build_lm_dataset(records: list[dict], tokenizer: Any, *, max_length: int, response_only: bool = True):
    """Tokenize records for causal-LM training: ``input_ids``, ``attention_mask``, ``labels``, ``id``.

    Labels are -100 on prompt tokens when ``response_only``. Examples whose prompt alone fills ``max_length`` are
    dropped; longer ones are truncated (the response is cut). Returns ``(dataset, stats)``.
    """
    from datasets import Dataset

    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "id": []}
    truncated = dropped = 0
    longest_prompt = 0
    texts = [format_example(tokenizer, rec) for rec in records]
    # one batched call per side: fast tokenizers encode a list in one go, much faster than record by record
    prompt_ids = tokenizer([t[0] for t in texts], add_special_tokens=False)["input_ids"] if texts else []
    response_ids = tokenizer([t[1] for t in texts], add_special_tokens=False)["input_ids"] if texts else []
    for rec, p_ids, r_ids in zip(records, prompt_ids, response_ids):
        if adds_bos(tokenizer):  # the BOS rule the server applies too (nora_peft/prompt.py)
            p_ids = [tokenizer.bos_token_id, *p_ids]
        longest_prompt = max(longest_prompt, len(p_ids))
        if len(p_ids) >= max_length:
            dropped += 1
            continue
        ids = (p_ids + r_ids)[:max_length]
        truncated += len(p_ids) + len(r_ids) > max_length
        labels = ([-100] * len(p_ids) if response_only else list(p_ids)) + r_ids
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(labels[: len(ids)])
        rows["id"].append(rec["id"])
    stats = {"examples": len(records), "kept": len(rows["id"]), "truncated": truncated, "dropped": dropped}
    if not rows["id"]:
        raise ValueError(
            f"No example fits max_length={max_length}: all {len(records)} prompts are at least that long (longest "
            f"prompt {longest_prompt} tokens). Raise --max-length above the prompt length."
        )
    return Dataset.from_dict(rows), stats


def _count(size: float | int, n: int) -> int:
    return int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)


def make_splits(
    native: dict[str, list[dict]],
    *,
    seed: int = 0,
    val_size: float | int = 0.1,
    test_size: float | int = 0.1,
) -> dict[str, list[dict]]:
    """Deterministic ``train`` / ``validation`` / ``test`` splits (a native test or validation split is kept)."""
    pool = list(native.get("train", []))
    rng = random.Random(f"splits-{seed}")
    order = list(range(len(pool)))
    rng.shuffle(order)
    pool = [pool[i] for i in order]
    test = list(native["test"]) if native.get("test") else None
    validation = list(native["validation"]) if native.get("validation") else None
    if test is None:
        n = _count(test_size, len(pool))
        test, pool = pool[:n], pool[n:]
    if validation is None:
        n = _count(val_size, len(pool) + len(test) if isinstance(val_size, float) else len(pool))
        validation, pool = pool[:n], pool[n:]
    splits = {"train": pool, "validation": validation, "test": test}
    ids = [r["id"] for part in splits.values() for r in part]
    if len(ids) != len(set(ids)):
        raise ValueError("Record ids are not unique across splits; give each record a distinct id.")
    if not pool:
        raise ValueError(f"The train split is empty after taking validation={len(validation)}, test={len(test)}.")
    return splits


def describe_splits(splits: dict[str, list[dict]], *, source: str, seed: int) -> dict:
    """What data a run saw: source, seed, counts and ids per split (written as ``splits.json``)."""
    return {
        "source": source,
        "seed": seed,
        "counts": {k: len(v) for k, v in splits.items()},
        "ids": {k: [r["id"] for r in v] for k, v in splits.items()},
    }


# A number as models and GSM8K write it: optional sign (ASCII or unicode minus), optional "$", digits with optional
# thousands commas, optional decimals ("1,234.50", "-7", "$18", ".5"). A trailing "." is punctuation, not a decimal
# point, because the decimal part needs a digit after it.
_NUMBER = r"[-\u2212]?\s?\$?\s?[-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_FINAL = re.compile(r"####[ \t]*(?:[^\d\n$\u2212.-]{0,20}?)(" + _NUMBER + ")")  # "#### 42", "#### Answer: $42"
_THE_ANSWER = re.compile(r"[Tt]he (?:final )?answer is:?[ \t]*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
# The "#### N" line is complete once the number is followed by something that cannot continue it: a character other
# than a digit, "," or "." -- or a "," / "." followed by a non-digit. Until then the next token may add digits
# ("#### 1" -> "#### 1,234.5"), so generation must not stop there.
_FINAL_DONE = re.compile(r"####[ \t]*(?:[^\d\n$\u2212.-]{0,20}?)" + _NUMBER + r"(?:[^\d.,]|[.,][^\d])")


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer a response states, normalized (``"#### $1,234.50."`` -> ``"1234.5"``), else ``None``.

    The last ``#### N`` wins (GSM8K's format); without one, the last ``The answer is N``; with
    ``last_number_fallback``, the last number anywhere.
    """
    for pattern in (_FINAL, _THE_ANSWER) + ((_ANY_NUMBER,) if last_number_fallback else ()):
        found = pattern.findall(text)
        if found:
            return normalize_answer(found[-1])
    return None


def answer_is_complete(text: str) -> bool:
    """Whether ``text`` holds a finished ``#### N`` line (the number cannot grow any more): where generation may stop
    early without changing what :func:`extract_answer` reads from the ``####`` line."""
    return _FINAL_DONE.search(text) is not None


def normalize_answer(text: str) -> str:
    """Numbers by value (``"$1,234.50"`` -> ``"1234.5"``, ``"18.0"`` -> ``"18"``, ``"\u22127"`` -> ``"-7"``); other text
    stripped (see ``loaders.normalize_number``)."""
    return normalize_number(text)


def answers_match(prediction: str | None, gold: str | None) -> bool:
    """Exact match after normalization (numbers compare by value: ``"18.0" == "18"``)."""
    if prediction is None or gold is None:
        return False
    return normalize_answer(prediction) == normalize_answer(gold)
