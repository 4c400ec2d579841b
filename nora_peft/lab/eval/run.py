"""Records or a run dir -> every metric: perplexity on all records, generation scores on those with something to
score, the base model's perplexity beside the adapter's; ``evaluate_run`` writes ``eval_<split>.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...io import write_json_atomic
from .base_reference import base_perplexity
from .generation import default_max_new_tokens, generate
from .loading import load_run
from .perplexity import perplexities
from .scoring import is_logistic, score_answers, score_logistic


def evaluate_records(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    generate_outputs: bool = True,
    max_length: int = 256,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_generate: int | None = None,
    precision: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity (response-only and full), and with ``generate_outputs`` accuracy and logistic-map metrics.

    Perplexity uses every record (one forward pass each); generation, the expensive part, only the first
    ``max_generate`` records when that is set. ``precision`` "bf16" / "fp16" runs both under autocast.

    Top-level scalars for tables: ``ppl`` / ``nll`` / ``tokens`` (response tokens), ``ppl_full`` / ``nll_full``
    (every token), ``accuracy`` and ``accuracy_ci95`` (records with an answer); details under ``perplexity``,
    ``generation``, ``logistic``; wall times under ``seconds``.
    """
    if not records:
        raise ValueError("No records to evaluate (the split is empty); choose another --split or data source.")
    start = time.perf_counter()
    kw = dict(batch_size=batch_size, precision=precision, progress=progress)
    both = perplexities(model, tokenizer, records, max_length=max_length, **kw)
    response, full = both["response"], both["full"]
    result: dict[str, Any] = {
        "n": len(records),
        "ppl": response["ppl"],
        "nll": response["nll"],
        "tokens": response["tokens"],
        "ppl_full": full["ppl"],
        "nll_full": full["nll"],
        "perplexity": {"response": response, "full": full},
        "precision": precision or "fp32",
        "seconds": {"perplexity": round(time.perf_counter() - start, 2)},
    }
    if generate_outputs:
        gen_records = records[:max_generate] if max_generate else records
        result["n_generated"] = len(gen_records)
        scored = [r for r in gen_records if r.get("answer") is not None or is_logistic(r)]
        if scored:
            start = time.perf_counter()
            mnt = max_new_tokens or default_max_new_tokens(tokenizer, scored)
            gen_stats: dict[str, Any] = {}
            predictions = generate(model, tokenizer, scored, max_new_tokens=mnt, stats=gen_stats, **kw)
            result["seconds"]["generation"] = round(time.perf_counter() - start, 2)
            result["max_new_tokens"] = mnt
            result["generation_stats"] = gen_stats
            score_generations(result, scored, predictions)
    return result


def score_generations(result: dict[str, Any], records: list[dict[str, Any]], predictions: list[str]) -> None:
    """Answer accuracy (records with an answer) and logistic-map metrics (logistic records), into ``result``."""
    answered = [(r, p) for r, p in zip(records, predictions) if r.get("answer") is not None]
    if answered:
        result["generation"] = score_answers([r for r, _ in answered], [p for _, p in answered])
        result["accuracy"] = result["generation"]["accuracy"]
        result["accuracy_ci95"] = result["generation"]["ci95"]
    logistic = [(r, p) for r, p in zip(records, predictions) if is_logistic(r)]
    if logistic:
        result["logistic"] = score_logistic([r for r, _ in logistic], [p for _, p in logistic])


def add_base_reference(
    result: dict[str, Any],
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    base_name: str | None,
    max_length: int,
    batch_size: int = 8,
    precision: str | None = None,
    progress: bool = False,
) -> None:
    """``result["base"]``: the base's perplexity on the same records (cached per base and records, see
    ``base_reference``), and its time under ``result["seconds"]["base"]`` (about 0 when it came from the cache)."""
    start = time.perf_counter()
    result["base"] = base_perplexity(model, tokenizer, records, base_name=base_name, max_length=max_length,
                                     batch_size=batch_size, precision=precision, progress=progress)  # fmt: skip
    result.setdefault("seconds", {})["base"] = round(time.perf_counter() - start, 2)


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    generate: bool = True,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_generate: int | None = None,
    precision: str | None = None,
    progress: bool = False,
    base_reference: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run on a split of its own data; writes ``run_dir/eval_<split>.json`` atomically.

    ``max_examples`` caps every metric's records; ``max_generate`` only the generated ones (perplexity stays on all).
    ``precision`` defaults to the run's own (``auto`` resolved on this machine). With ``base_reference``, the base's
    perplexity on the same records is under ``"base"`` (computed once per base and split, then cached).
    """
    from ..train import resolve_precision

    run_dir = Path(run_dir)
    model, tokenizer, cfg, splits = load_run(run_dir)
    if split not in splits:
        raise ValueError(f"Unknown split {split!r}; this run has {sorted(splits)}.")
    records = splits[split][:max_examples] if max_examples else splits[split]
    precision = resolve_precision(precision or cfg.precision)
    kw = dict(max_length=cfg.max_length, batch_size=batch_size, precision=precision, progress=progress)
    result = evaluate_records(model, tokenizer, records, generate_outputs=generate, max_new_tokens=max_new_tokens,
                              max_generate=max_generate, **kw)  # fmt: skip
    if base_reference:
        add_base_reference(result, model, tokenizer, records, base_name=cfg.model, **kw)
    result.update(
        run_dir=str(run_dir),
        split=split,
        data=cfg.data,
        method=cfg.adapter.method,
        label=cfg.adapter.label(),
        max_examples=max_examples,
    )
    write_json_atomic(run_dir / f"eval_{split}.json", result)
    return result
