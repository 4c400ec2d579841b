"""Run dir or model -> perplexity, generation accuracy, logistic-map scores; ``nora eval``.

* ``perplexities``: token-weighted, ``exp(sum NLL / sum tokens)`` over response tokens (exactly the tokens training
  puts a loss on) and over every token, from one forward pass per batch of similar-length records.
* ``generate``: batched greedy decoding with the KV cache, left padding, batches of similar prompt length, and an early
  stop per row at EOS or once its ``#### N`` line is complete; what a row generates does not depend on the batch.
* ``score_answers``: exact match of ``extract_answer`` against the record's ``answer``, with a 95% Wilson interval.
* ``score_logistic``: for the logistic-map task, the absolute error per step and *state collapse* (the model repeats
  a value while the true orbit moves on).
* ``evaluate_run(run_dir)``: all of the above on a split of the run's own data, written to ``eval_<split>.json``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import read_json, write_json_atomic
from ..kernels.attention import folded_decode_attention
from .torch_utils import eval_mode

#: how many {id, question, prediction, gold} examples a result keeps for eyeballing
N_EXAMPLES = 5
#: the normal quantile of a two-sided 95% interval
Z95 = 1.959963984540054


class AdapterMismatchError(ValueError):
    """The adapter's layers or shapes do not fit the base model it is loaded onto."""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    """The id padded positions get (they are masked out, so any id works; eos when the tokenizer has no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def autocast(model: torch.nn.Module, precision: str | None):
    """``torch.autocast`` for ``precision`` "bf16" / "fp16" on the model's device; no-op for ``None`` / "fp32" (the
    weights' own dtype)."""
    if precision in (None, "fp32"):
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(_device(model).type, dtype=dtype)


@contextmanager
def _inference(model: torch.nn.Module, precision: str | None) -> Iterator[None]:
    with torch.no_grad(), eval_mode(model), autocast(model, precision):
        yield


def decode_weights(model: torch.nn.Module, precision: str | None) -> tuple[torch.nn.Module, str | None]:
    """The model and precision greedy decoding runs with: for "bf16" on a CPU with fp32 weights, a copy of the model
    whose parameters are bf16 (buffers such as RoPE's ``inv_freq`` stay fp32), run without autocast.

    Why: autocast re-casts every fp32 weight to bf16 at every call and leaves the rotated keys of the KV cache in
    fp32, so one decode step of smollm2-135m spends most of its time copying (measured 333 ms vs 150 ms per step at
    batch 16 on one core). The matmuls are bf16 either way; the residual stream of the copy is bf16 too, as in any
    model loaded in bf16. The caller's model is left as it is (perplexity keeps the fp32 residual stream)."""
    if precision != "bf16" or _device(model).type != "cpu" or any(p.dtype != torch.float32 for p in model.parameters()):
        return model, precision
    copy = deepcopy(model)  # deepcopy keeps tied weights tied, so each shared tensor is cast once
    for p in copy.parameters():
        p.data = p.data.to(torch.bfloat16)
    return copy, None


def _length_batches(lengths: list[int], batch_size: int, progress: str | None = None) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable), so a batch pads little; with ``progress``
    (a label), a line on stderr per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
        if progress:
            done = min(i + batch_size, len(order))
            print(f"[nora eval] {progress}: {done}/{len(order)} records, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------
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
    from .data import build_lm_dataset
    from .train import collate

    dataset, stats = build_lm_dataset(records, tokenizer, max_length=max_length, response_only=True)
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    device, pad = _device(model), _pad_id(tokenizer)
    nll = {"response": 0.0, "full": 0.0}
    tokens = {"response": 0, "full": 0}
    slots = 0
    with _inference(model, precision):
        for idx in _length_batches([len(x) for x in input_ids], batch_size, "perplexity" if progress else None):
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


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, records: list[dict[str, Any]]) -> list[list[int]]:
    """The token ids of each record's formatted prompt, exactly as training sees them (taken from
    ``build_lm_dataset``: the positions whose label is -100), so generation starts from the same context."""
    from .data import build_lm_dataset

    bare = [{**r, "response": ""} for r in records]
    dataset, _ = build_lm_dataset(bare, tokenizer, max_length=1 << 30, response_only=True)
    return [ids[: labels.count(-100)] for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The ids that end a reply: the generation config's (one or several), else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def _answer_done(tokenizer, tail: int = 32):
    """The early-stop rule on a row's new token ids: its ``#### N`` line is complete (``data.answer_is_complete``).
    Only the last ``tail`` tokens are decoded: the rule is checked every step, so the line is found the step its
    number ends, well within them."""
    from . import data  # looked up at call time, so tests can stand in another rule

    return lambda ids: data.answer_is_complete(tokenizer.decode(ids[-tail:], skip_special_tokens=True))


@torch.no_grad()
def _greedy_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos: list[int],
    done: Any = None,
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
    device, pad, eos = _device(model), _pad_id(tokenizer), _eos_ids(model, tokenizer)
    done = _answer_done(tokenizer) if stop_at_answer else None
    prompts = prompt_ids(tokenizer, records)
    outputs: list[str] = [""] * len(prompts)
    counts = {"new_tokens": 0, "stopped_at_answer": 0, "stopped_at_eos": 0, "hit_max_new_tokens": 0}
    with _inference(model, precision), folded_decode_attention(model):  # left padding: sdpa would repeat KV heads
        for idx in _length_batches([len(p) for p in prompts], batch_size, "generation" if progress else None):
            chunk = [prompts[i] for i in idx]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            rows = _greedy_rows(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos=eos, done=done)
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


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``correct / n`` (95% by default): the ``p`` with
    ``|correct/n - p| <= z * sqrt(p (1 - p) / n)``. Unlike ``p +- z*se`` it stays within [0, 1] and is not empty at
    0 or n correct. ``None`` for ``n == 0``."""
    if n <= 0:
        return None
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0 and n correct the bound is exactly 0 / 1 (the formula gives it up to rounding)
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


def score_answers(records: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``extract_answer(prediction)`` against each record's ``answer`` (records without an
    answer are skipped): ``{"accuracy", "ci95" (Wilson), "n", "correct", "answered" (an answer could be read),
    "accuracy_last_number" (reading the last number when no answer line), "examples"}``."""
    from .data import answers_match, extract_answer

    n = correct = answered = lenient = 0
    examples = []
    for rec, text in zip(records, predictions):
        if rec.get("answer") is None:
            continue
        pred = extract_answer(text)
        ok = answers_match(pred, rec["answer"])
        n, correct, answered = n + 1, correct + ok, answered + (pred is not None)
        lenient += ok or answers_match(extract_answer(text, last_number_fallback=True), rec["answer"])
        if len(examples) < N_EXAMPLES:
            examples.append({"id": rec["id"], "question": rec.get("prompt", "")[:300], "prediction": pred,
                             "gold": rec["answer"], "output": text[-300:]})  # fmt: skip
    return {
        "accuracy": correct / n if n else None,
        "ci95": wilson_interval(correct, n),
        "n": n,
        "correct": correct,
        "answered": answered,
        "accuracy_last_number": lenient / n if n else None,
        "examples": examples,
    }


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    precision: str | None = None,
) -> dict[str, Any]:
    """Greedy-decode every record with an answer and score exact match (:func:`score_answers`)."""
    records = [r for r in records if r.get("answer") is not None]
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, records)
    predictions = generate(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision
    )
    return score_answers(records, predictions)


# ---------------------------------------------------------------------------------------------------------------
# Logistic map
# ---------------------------------------------------------------------------------------------------------------
def is_logistic(record: dict[str, Any]) -> bool:
    """Records of the synthetic logistic-map task (their ids start with ``logistic``)."""
    return str(record.get("id", "")).startswith("logistic")


def score_logistic(records: list[dict[str, Any]], predictions: list[str], *, tol: float = 1e-9) -> dict[str, Any]:
    """Per-step absolute error and state collapse of predicted logistic-map orbits.

    For step index ``i`` the error is the mean over records of ``|pred_i - true_i|`` (records whose prediction has
    no step ``i`` count in ``missing_per_step`` instead). A record *collapses* when at some step ``i >= 1`` the
    prediction repeats its previous value (``|pred_i - pred_{i-1}| <= tol``) while the true orbit does not; we report
    the fraction of records that collapse, and the mean first step where they do (1-based: step 2 means ``x2``
    repeated ``x1``). ``abs_error_per_step[0]`` is the error of ``x1``.
    """
    from .data import answers_match, extract_answer, parse_logistic_steps

    errors: list[list[float]] = []
    missing: list[int] = []
    collapsed_at: list[int] = []
    correct = n_answer = 0
    for rec, text in zip(records, predictions):
        gold, pred = parse_logistic_steps(rec["response"]), parse_logistic_steps(text)
        while len(errors) < len(gold):
            errors.append([])
            missing.append(0)
        for i, g in enumerate(gold):
            if i < len(pred):
                errors[i].append(abs(pred[i] - g))
            else:
                missing[i] += 1
        for i in range(1, min(len(pred), len(gold))):
            if abs(pred[i] - pred[i - 1]) <= tol and abs(gold[i] - gold[i - 1]) > tol:
                collapsed_at.append(i + 1)
                break
        if rec.get("answer") is not None:
            n_answer += 1
            correct += bool(answers_match(extract_answer(text), rec["answer"]))
    n = len(records)
    per_step = [sum(e) / len(e) if e else None for e in errors]
    scored = [x for e in errors for x in e]
    return {
        "n": n,
        "abs_error_per_step": per_step,
        "missing_per_step": missing,
        "mean_abs_error": sum(scored) / len(scored) if scored else None,
        "collapse_rate": len(collapsed_at) / n if n else None,
        "collapsed": len(collapsed_at),
        "mean_collapse_step": sum(collapsed_at) / len(collapsed_at) if collapsed_at else None,
        "accuracy": correct / n_answer if n_answer else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Models, adapters, run dirs
# ---------------------------------------------------------------------------------------------------------------
def load_adapter(base: torch.nn.Module, adapter_dir: str | Path, *, base_name: str | None = None):
    """``PeftModel.from_pretrained`` (NoRA or LoRA), after checking that the adapter fits ``base`` (the core check,
    ``nora_peft.checkpoint.check_fits_model``, names every layer and both shapes)."""
    from peft import PeftModel

    from ..checkpoint import CheckpointError, check_fits_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter dir (no adapter_config.json).")
    try:
        check_fits_model(adapter_dir, base, model_label=f"base model {base_name or '(embedded default)'}")
    except CheckpointError as e:
        raise AdapterMismatchError(str(e)) from None
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_run(run_dir: str | Path):
    """``(peft_model, tokenizer, TrainConfig, splits)`` of a finished run; ``splits`` are the records per split,
    rebuilt from ``config.json`` and checked against the ids in ``splits.json``."""
    from ..bases.named import load_model_and_tokenizer
    from .train import TrainConfig, base_dtype, load_splits, resolve_precision

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run dir (no config.json); train one with `nora train`.")
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ yet: the run has not finished (`nora train --resume`).")
    cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    splits = load_splits(cfg)
    _check_split_ids(run_dir, splits)
    base, tokenizer = load_model_and_tokenizer(cfg.model, dtype=base_dtype(resolve_precision(cfg.precision)))
    if torch.cuda.is_available():
        base = base.to("cuda")
    model = load_adapter(base, run_dir / "adapter", base_name=cfg.model)
    model.eval()
    return model, tokenizer, cfg, splits


def _check_split_ids(run_dir: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Fail loudly if the data no longer produces the splits the run was trained with."""
    path = run_dir / "splits.json"
    if not path.exists():
        return
    saved = read_json(path)
    ids = saved.get("ids", saved)
    for name, recs in splits.items():
        want = ids.get(name) if isinstance(ids, dict) else None
        if isinstance(want, list) and want != [r["id"] for r in recs]:
            raise ValueError(
                f"The {name!r} split rebuilt from {run_dir}/config.json differs from the one in splits.json (the data "
                "source changed since training). Evaluate on the original data, or retrain."
            )


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
            _score_generations(result, scored, predictions)
    return result


def _score_generations(result: dict[str, Any], records: list[dict[str, Any]], predictions: list[str]) -> None:
    """Answer accuracy (records with an answer) and logistic-map metrics (logistic records), into ``result``."""
    answered = [(r, p) for r, p in zip(records, predictions) if r.get("answer") is not None]
    if answered:
        result["generation"] = score_answers([r for r, _ in answered], [p for _, p in answered])
        result["accuracy"] = result["generation"]["accuracy"]
        result["accuracy_ci95"] = result["generation"]["ci95"]
    logistic = [(r, p) for r, p in zip(records, predictions) if is_logistic(r)]
    if logistic:
        result["logistic"] = score_logistic([r for r, _ in logistic], [p for _, p in logistic])


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
) -> dict[str, Any]:
    """Evaluate a finished run on a split of its own data; writes ``run_dir/eval_<split>.json`` atomically.

    ``max_examples`` caps every metric's records; ``max_generate`` only the generated ones (perplexity stays on all).
    ``precision`` defaults to the run's own (``auto`` resolved on this machine).
    """
    from .train import resolve_precision

    run_dir = Path(run_dir)
    model, tokenizer, cfg, splits = load_run(run_dir)
    if split not in splits:
        raise ValueError(f"Unknown split {split!r}; this run has {sorted(splits)}.")
    records = splits[split][:max_examples] if max_examples else splits[split]
    result = evaluate_records(
        model,
        tokenizer,
        records,
        generate_outputs=generate,
        max_length=cfg.max_length,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_generate=max_generate,
        precision=resolve_precision(precision or cfg.precision),
        progress=progress,
    )
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


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import _mapping

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--run", help="a run dir from `nora train` (its base, adapter and data splits)")
    src.add_argument("--model", help="a base model: a name (smollm2-135m), a dir or a hub id (default: embedded) ...")
    parser.add_argument("--adapter", help="... with this peft adapter dir (NoRA or LoRA); omit for the base alone")
    parser.add_argument("--data", help="data source (default: the run's data, else reasoning)")
    parser.add_argument("--data-options", type=_mapping, default=None, help="load_source options: KEY=VALUE,...")
    parser.add_argument("--field-map", type=_mapping, default=None, help="record field -> column for local files")
    parser.add_argument("--split", default="test", help="train / validation / test (default test)")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument(
        "--max-generate", type=int, default=None, help="generate on the first N only (perplexity on all)"
    )
    parser.add_argument("--no-generate", action="store_true", help="perplexity only (skip generation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: run's or 256)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                        help="autocast precision (default: the run's; auto for --model)")  # fmt: skip
    parser.add_argument("--data-seed", type=int, default=0, help="split seed for --model (a run uses its own)")
    parser.add_argument("--out", help="where to write the JSON (default: next to the run / adapter, else runs/eval/)")


def _evaluate_model_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """``--model [--adapter]``: load, build the requested split, evaluate; the default JSON path."""
    from ..bases.named import load_model_and_tokenizer
    from .data import load_source, make_splits
    from .train import base_dtype, resolve_precision

    data = args.data or "reasoning"
    native = load_source(data, field_map=args.field_map, seed=args.data_seed, **(args.data_options or {}))
    splits = make_splits(native, seed=args.data_seed)
    if args.split not in splits:
        raise ValueError(f"Unknown split {args.split!r}; {data!r} has {sorted(splits)}.")
    records = splits[args.split][: args.max_examples] if args.max_examples else splits[args.split]
    precision = resolve_precision(args.precision or "auto")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=base_dtype(precision))
    if torch.cuda.is_available():
        model = model.to("cuda")
    if args.adapter:
        model = load_adapter(model, args.adapter, base_name=args.model)
    result = evaluate_records(
        model,
        tokenizer,
        records,
        generate_outputs=not args.no_generate,
        max_length=args.max_length or 256,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_generate=args.max_generate,
        precision=precision,
        progress=True,
    )
    result.update(model=args.model, adapter=args.adapter, data=data, split=args.split, max_examples=args.max_examples)
    name = f"eval_{_slug(data)}_{args.split}.json"
    where = (
        Path(args.adapter) / name
        if args.adapter
        else Path("runs") / "eval" / f"{_slug(args.model or 'default')}_{name}"
    )
    return result, where


def _slug(text: str) -> str:
    """A file-name-safe short form of a model or data name (``/path/to/data.jsonl`` -> ``data``)."""
    stem = Path(text).stem if "/" in text or text.endswith((".jsonl", ".json", ".csv", ".parquet")) else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "data"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(result: dict[str, Any], where: Path | None = None) -> str:
    """A short text summary of an eval result for a person: what was evaluated, perplexity, accuracy with its 95%
    Wilson interval, time, and a few examples (question, prediction, gold)."""
    what = result.get("label") or (f"{result.get('model') or 'default'} + {result['adapter']}" if result.get("adapter")
                                   else f"{result.get('model') or 'default base'} (no adapter)")  # fmt: skip
    lines = [f"nora eval: {what} on {result.get('data')} {result.get('split')} ({result['n']} records)"]
    lines.append(
        f"  perplexity  response {result['ppl']:.3f} ({result['tokens']:,} tokens), full {result['ppl_full']:.3f}"
    )
    gen = result.get("generation")
    if gen:
        ci = gen.get("ci95") or (None, None)
        lines.append(f"  accuracy    {_pct(gen['accuracy'])} ({gen['correct']}/{gen['n']}), 95% CI [{_pct(ci[0])}, "
                     f"{_pct(ci[1])}]; an answer could be read from {gen['answered']}/{gen['n']}")  # fmt: skip
    if "logistic" in result:
        lg = result["logistic"]
        lines.append(f"  logistic    mean |error| {lg['mean_abs_error']}, collapse rate {_pct(lg['collapse_rate'])}")
    secs, st = result.get("seconds", {}), result.get("generation_stats")
    timing = f"  time        perplexity {secs.get('perplexity', 0):.0f} s"
    if st:
        timing += (
            f", generation {secs.get('generation', 0):.0f} s ({st['new_tokens']:,} new tokens; stopped at "
            f"'####' {st['stopped_at_answer']}, EOS {st['stopped_at_eos']}, the cap {st['hit_max_new_tokens']})"
        )
    lines.append(timing + f" [{result.get('precision', 'fp32')}]")
    for ex in (gen or {}).get("examples", [])[:3]:
        question = " ".join(ex["question"].split())
        mark = "right" if ex["prediction"] is not None and ex["prediction"] == ex["gold"] else "wrong"
        lines.append(f"  - {question[:110]}{'...' if len(question) > 110 else ''}")
        lines.append(f"      predicted {ex['prediction']}, gold {ex['gold']} ({mark})")
    if where is not None:
        lines.append(f"  JSON: {where}")
    return "\n".join(lines)


def _evaluate_cli(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Dispatch ``--run`` (its own data, or with ``--data`` ... other data) and ``--model``."""
    if not args.run:
        return _evaluate_model_args(args)
    run_dir = Path(args.run)
    if args.data or args.data_options or args.field_map or args.max_length:  # the run's adapter, other data
        from .train import TrainConfig

        if not (run_dir / "config.json").exists():
            raise FileNotFoundError(f"{run_dir} is not a run dir (no config.json).")
        cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
        args.model, args.adapter = cfg.model, str(run_dir / "adapter")
        args.max_length = args.max_length or cfg.max_length
        args.precision = args.precision or cfg.precision
        return _evaluate_model_args(args)
    result = evaluate_run(
        run_dir,
        split=args.split,
        generate=not args.no_generate,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_generate=args.max_generate,
        precision=args.precision,
        progress=True,
    )
    return result, run_dir / f"eval_{args.split}.json"


def main(args: argparse.Namespace) -> int:
    """``nora eval``: evaluate, write the JSON (next to the run / adapter, or ``--out``), print a short summary."""
    try:
        result, where = _evaluate_cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nora eval: {e}", file=sys.stderr)
        return 2
    where = Path(args.out) if args.out else where
    write_json_atomic(where, result)
    print(format_summary(result, where))
    return 0
