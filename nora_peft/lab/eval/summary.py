"""An eval result as a few lines for a person: numbers to three significant digits, words where there is no number,
and the base model's perplexity next to the adapter's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def significant(x: float | None, digits: int = 3, missing: str = "n/a") -> str:
    """``x`` to ``digits`` significant digits in plain notation with thousands separators (``112.669`` -> ``113``,
    ``0.012345`` -> ``0.0123``, ``15368.2`` -> ``15,400``); ``missing`` for ``None`` or a non-finite value."""
    if x is None or not math.isfinite(x):
        return missing
    if x == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    rounded = round(x, decimals)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > math.floor(math.log10(abs(x))):
        decimals -= 1  # 9.996 rounds up to 10.0: one decimal fewer keeps three digits
    return f"{rounded:,.{max(decimals, 0)}f}"


def percent(x: float | None, missing: str = "n/a") -> str:
    """A fraction as a percentage to three significant digits (``0.0123`` -> ``1.23%``)."""
    return missing if x is None else f"{significant(100 * x)}%"


def _title(result: dict[str, Any]) -> str:
    if result.get("label"):
        return result["label"]
    if result.get("adapter"):
        return f"{result.get('model') or 'default'} + {result['adapter']}"
    return f"{result.get('model') or 'default base'} (no adapter)"


def _perplexity_line(result: dict[str, Any]) -> str:
    base = result.get("base")
    response, full = significant(result["ppl"]), significant(result["ppl_full"])
    if base:
        response += f" (base {significant(base['ppl'])})"
        full += f" (base {significant(base['ppl_full'])})"
    return f"  perplexity  response {response}, full {full}; {result['tokens']:,} response tokens"


def _generation_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    gen = result.get("generation")
    if gen:
        ci = gen.get("ci95") or (None, None)
        lines.append(
            f"  accuracy    {percent(gen['accuracy'])} ({gen['correct']}/{gen['n']}), 95% CI [{percent(ci[0])}, "
            f"{percent(ci[1])}]; an answer could be read from {gen['answered']}/{gen['n']}"
        )
    if "logistic" in result:
        lg = result["logistic"]
        error = significant(lg["mean_abs_error"], missing="no reply parsed")
        lines.append(f"  logistic    mean |error| {error}, collapse rate {percent(lg['collapse_rate'])}")
    return lines


def _timing_line(result: dict[str, Any]) -> str:
    secs, st = result.get("seconds", {}), result.get("generation_stats")
    timing = f"  time        perplexity {significant(secs.get('perplexity', 0))} s"
    if "base" in secs:  # a cached base costs nothing: say so rather than print a few milliseconds
        timing += ", base cached" if result.get("base", {}).get("cached") else f", base {significant(secs['base'])} s"
    if st:
        timing += (
            f", generation {significant(secs.get('generation', 0))} s ({st['new_tokens']:,} new tokens; stopped at "
            f"'####' {st['stopped_at_answer']}, EOS {st['stopped_at_eos']}, the cap {st['hit_max_new_tokens']})"
        )
    return timing + f" [{result.get('precision', 'fp32')}]"


def _example_lines(result: dict[str, Any], n: int = 3) -> list[str]:
    from ..data import answers_match  # the scoring rule (numbers by value: "18.0" is "18")

    lines = []
    for ex in (result.get("generation") or {}).get("examples", [])[:n]:
        question = " ".join(ex["question"].split())
        predicted = "no answer parsed" if ex["prediction"] is None else ex["prediction"]
        mark = "right" if answers_match(ex["prediction"], ex["gold"]) else "wrong"
        lines.append(f"  - {question[:110]}{'...' if len(question) > 110 else ''}")
        lines.append(f"      predicted {predicted}, gold {ex['gold']} ({mark})")
    return lines


def format_summary(result: dict[str, Any], where: Path | None = None) -> str:
    """A short text summary of an eval result for a person: what was evaluated, perplexity (with the base's next to
    it), accuracy with its 95% Wilson interval, time, and a few examples (question, prediction, gold)."""
    lines = [f"nora eval: {_title(result)} on {result.get('data')} {result.get('split')} ({result['n']} records)"]
    lines += [_perplexity_line(result), *_generation_lines(result), _timing_line(result), *_example_lines(result)]
    if where is not None:
        lines.append(f"  JSON: {where}")
    return "\n".join(lines)
