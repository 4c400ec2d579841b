"""Token-weighted perplexity, ``exp(sum NLL / sum tokens)``, over response tokens (exactly the tokens training puts a
loss on) and over every token, from one forward pass per batch of similar-length records."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ...prompt import pad_id
from .inference import inference, length_batches, model_device


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    """Token-weighted perplexity of ``records``: ``exp(sum NLL / sum tokens)``.

    The tokens are those ``data.build_lm_dataset`` labels: response tokens (``response_only=True``) or every token
    after the first. Returns ``{"ppl", "nll" (mean per token), "tokens", "examples", "stats"}``; examples whose
    prompt does not fit ``max_length`` are left out (counted in ``stats["dropped"]``).
    """
    both = perplexities(model, tokenizer, records, max_length=max_length, batch_size=batch_size, precision=precision)
    return both["response" if response_only else "full"]


def perplexities(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    precision: str | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{"response": ..., "full": ...}``, each as :func:`perplexity` returns it, from one forward pass per batch
    (the two differ only in which tokens are scored: the rows are the same). Records are batched by length (the
    sums do not depend on the order); ``stats["padding_fraction"]`` is the share of padded slots."""
    from ..data import build_lm_dataset
    from ..train.data import collate

    dataset, stats = build_lm_dataset(records, tokenizer, max_length=max_length, response_only=True)
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    device, pad = model_device(model), pad_id(tokenizer)
    nll = {"response": 0.0, "full": 0.0}
    tokens = {"response": 0, "full": 0}
    slots = 0
    with inference(model, precision):
        for idx in length_batches([len(x) for x in input_ids], batch_size, "perplexity" if progress else None):
            feats = [{"input_ids": input_ids[i], "attention_mask": [1] * len(input_ids[i]), "labels": labels[i]}
                     for i in idx]  # fmt: skip
            batch = {k: v.to(device) for k, v in collate(feats, pad).items()}
            slots += batch["input_ids"].numel()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # next-token NLL at every real (non-pad) position, then summed under each label mask
            full = batch["attention_mask"][:, 1:].bool()
            token_nll = F.cross_entropy(logits[:, :-1][full].float(), batch["input_ids"][:, 1:][full], reduction="none")
            response = (batch["labels"][:, 1:] != -100)[full]
            for kind, mask in (("full", None), ("response", response)):
                picked = token_nll if mask is None else token_nll[mask]
                nll[kind] += float(picked.double().sum())
                tokens[kind] += picked.numel()
    if tokens["response"] == 0:
        raise ValueError(
            f"No tokens to score: {len(records)} records, tokenisation stats {stats}. Check that the records have "
            "responses and that max_length is longer than the prompts."
        )
    stats = {**stats, "padding_fraction": round(1 - sum(map(len, input_ids)) / slots, 4) if slots else None}
    out = {}
    for kind in ("response", "full"):
        mean = nll[kind] / tokens[kind]
        out[kind] = {"ppl": math.exp(mean), "nll": mean, "tokens": tokens[kind], "examples": len(input_ids),
                     "stats": stats}  # fmt: skip
    return out
