"""Scores of generated text: exact match against the record's answer (with a 95% Wilson interval), and for the
logistic-map task the absolute error per step and *state collapse* (the model repeats a value while the true orbit
moves on)."""

from __future__ import annotations

from typing import Any

from ..stats import wilson_interval

#: how many {id, question, prediction, gold} examples a result keeps for eyeballing
N_EXAMPLES = 5


def score_answers(records: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``extract_answer(prediction)`` against each record's ``answer`` (records without an
    answer are skipped): ``{"accuracy", "ci95" (Wilson), "n", "correct", "answered" (an answer could be read),
    "accuracy_last_number" (reading the last number when no answer line), "examples"}``."""
    from ..data import answers_match, extract_answer

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
    from ..data import answers_match, extract_answer, parse_logistic_steps

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
