"""Batched greedy decoding with the KV cache: left padding, batches of similar prompt length, and an early stop per
row at EOS or once its ``#### N`` line is complete; what a row generates does not depend on the batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...kernels.attention import folded_decode_attention
from ...prompt import eos_ids, pad_id
from .inference import decode_weights, inference, length_batches, model_device
from .scoring import score_answers


def prompt_ids(tokenizer, records: list[dict[str, Any]]) -> list[list[int]]:
    """The token ids of each record's formatted prompt, exactly as training sees them (taken from
    ``build_lm_dataset``: the positions whose label is -100), so generation starts from the same context."""
    from ..data import build_lm_dataset

    bare = [{**r, "response": ""} for r in records]
    dataset, _ = build_lm_dataset(bare, tokenizer, max_length=1 << 30, response_only=True)
    return [ids[: labels.count(-100)] for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def answer_done(tokenizer, tail: int = 32) -> Callable[[list[int]], bool]:
    """The early-stop rule on a row's new token ids: its ``#### N`` line is complete (``data.answer_is_complete``).
    Only the last ``tail`` tokens are decoded: the rule is checked every step, so the line is found the step its
    number ends, well within them."""
    from .. import data  # looked up at call time, so tests can stand in another rule

    return lambda ids: data.answer_is_complete(tokenizer.decode(ids[-tail:], skip_special_tokens=True))


@torch.no_grad()
def greedy_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos: list[int],
    done: Callable[[list[int]], bool] | None = None,
) -> list[tuple[list[int], str]]:
    """Greedy decoding of a left-padded batch with the KV cache: ``(new ids without the EOS, why it stopped)`` per
    row. A row leaves the batch (its cache rows are dropped) the step it hits EOS or ``done(ids)``, so the others go
    on with fewer rows; positions count from each row's first real token, as ``model.generate`` does."""
    rows = list(range(input_ids.shape[0]))  # the original row of each row still decoding
    new: list[list[int]] = [[] for _ in rows]
    why = ["hit_max_new_tokens"] * len(rows)
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    ids, mask, cache = input_ids, attention_mask, None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1)
        keep = []
        for j, (r, token) in enumerate(zip(rows, next_ids.tolist())):
            if token in eos:
                why[r] = "stopped_at_eos"
                continue
            new[r].append(token)
            if done is not None and done(new[r]):
                why[r] = "stopped_at_answer"
                continue
            keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            next_ids, mask, positions = next_ids[index], mask[index], positions[index]
            rows = [rows[j] for j in keep]
        ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return list(zip(new, why))


def generate(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop_at_answer: bool = True,
    precision: str | None = None,
    stats: dict[str, Any] | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of each record's formatted prompt: the new text only, in the order of ``records``.

    Batches of similar prompt length, left-padded, decoded with the KV cache; each row stops at EOS, at
    ``max_new_tokens``, or (``stop_at_answer``) once its ``#### N`` line is complete, and then leaves the batch. Rows
    do not see each other, so a row's text is what it would be alone (up to float noise in near-ties). ``stats``,
    when given, receives ``new_tokens`` (generated, summed), ``stopped_at_answer``, ``stopped_at_eos``,
    ``hit_max_new_tokens``. ``precision`` "bf16" on a CPU decodes with bf16 weights (``decode_weights``).
    """
    model, precision = decode_weights(model, precision)
    device, pad, eos = model_device(model), pad_id(tokenizer), eos_ids(model, tokenizer)
    done = answer_done(tokenizer) if stop_at_answer else None
    prompts = prompt_ids(tokenizer, records)
    outputs: list[str] = [""] * len(prompts)
    counts = {"new_tokens": 0, "stopped_at_answer": 0, "stopped_at_eos": 0, "hit_max_new_tokens": 0}
    with inference(model, precision), folded_decode_attention(model):  # left padding: sdpa would repeat KV heads
        for idx in length_batches([len(p) for p in prompts], batch_size, "generation" if progress else None):
            chunk = [prompts[i] for i in idx]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            rows = greedy_rows(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos=eos, done=done)
            for i, (ids, why) in zip(idx, rows):
                counts[why] += 1
                counts["new_tokens"] += len(ids)
                outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
    if stats is not None:
        stats.update(counts)
    return outputs


def default_max_new_tokens(tokenizer, records: list[dict[str, Any]], cap: int = 512) -> int:
    """Room for the longest reference response plus a margin (a greedy model that never stops costs no more)."""
    longest = max((len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records), default=16)
    return int(min(cap, longest + 16))


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    precision: str | None = None,
) -> dict[str, Any]:
    """Greedy-decode every record with an answer and score exact match (:func:`scoring.score_answers`)."""
    records = [r for r in records if r.get("answer") is not None]
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, records)
    predictions = generate(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision
    )
    return score_answers(records, predictions)
