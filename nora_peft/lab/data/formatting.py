"""Prompt formatting, response-only labels, deterministic splits and answer extraction."""

from __future__ import annotations

import random
import re
from typing import Any

from .loaders import normalize_number

#: Used when the tokenizer has no chat template (the embedded default base has none).
PLAIN_TEMPLATE = "### Question:\n{prompt}\n\n### Answer:\n"


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text up to where the response starts: the chat template if the tokenizer has one, else
    :data:`PLAIN_TEMPLATE`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def format_example(tokenizer: Any, record: dict) -> tuple[str, str]:
    """``(prompt_text, response_text)``; the response ends with the tokenizer's eos token."""
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
        if getattr(tokenizer, "bos_token_id", None) is not None and not getattr(tokenizer, "chat_template", None):
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


_ANSWER_PATTERNS = [re.compile(r"####\s*([^\n]+)"), re.compile(r"[Tt]he answer is:?\s*\$?([-\d.,]+\d|[-\d]+)")]


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer a response states (``#### N`` or ``The answer is N``), normalized; else ``None``."""
    for pattern in _ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return normalize_answer(found[-1])
    if last_number_fallback:
        numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
        if numbers:
            return normalize_answer(numbers[-1])
    return None


def normalize_answer(text: str) -> str:
    return normalize_number(text)


def answers_match(prediction: str | None, gold: str | None) -> bool:
    """Exact match after normalization (numbers compare by value: ``"18.0" == "18"``)."""
    if prediction is None or gold is None:
        return False
    return normalize_answer(prediction) == normalize_answer(gold)
