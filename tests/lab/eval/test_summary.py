"""The summary a person reads: three significant digits, words where there is no number."""

from __future__ import annotations

import pytest

from nora_peft.lab.eval.summary import format_summary, percent, significant


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (112.669, "113"),
        (10.2345, "10.2"),
        (436.179, "436"),
        (3.21, "3.21"),
        (2.5, "2.50"),
        (0.012345, "0.0123"),
        (15368.2, "15,400"),
        (9.996, "10.0"),
        (999.6, "1,000"),
        (-0.5, "-0.500"),
        (0, "0"),
    ],
)
def test_three_significant_digits(x, text):
    assert significant(x) == text
    if x:  # independent check: the printed number equals x rounded by %g to 3 significant digits
        assert float(text.replace(",", "")) == pytest.approx(float(f"{x:.3g}"))


def test_words_instead_of_none():
    assert significant(None) == "n/a" and significant(float("nan"), missing="no reply parsed") == "no reply parsed"
    assert percent(None) == "n/a" and percent(0.0123) == "1.23%" and percent(0) == "0%"
    result = {
        "n": 2, "ppl": 112.669, "ppl_full": 436.179, "tokens": 15368, "label": "nora-r8", "data": "reasoning",
        "split": "test", "seconds": {"perplexity": 2.0},
        "generation": {"accuracy": 0.0, "ci95": (0.0, 0.0186), "n": 2, "correct": 0, "answered": 0,
                       "examples": [{"id": "a", "question": "q?", "prediction": None, "gold": "0.5952"}]},
        "logistic": {"mean_abs_error": None, "collapse_rate": 0.0},
    }  # fmt: skip
    text = format_summary(result)
    assert "None" not in text
    assert "response 113, full 436; 15,368 response tokens" in text
    assert "mean |error| no reply parsed" in text and "predicted no answer parsed, gold 0.5952 (wrong)" in text


def test_eval_threads_flag_sets_torch_s_count_and_none_leaves_it(monkeypatch):
    import argparse

    from nora_peft.lab.eval.cli import set_threads

    seen = []
    monkeypatch.setattr("torch.set_num_threads", seen.append)
    set_threads(argparse.Namespace(run=None, model=None, threads=None))  # torch's own count
    set_threads(argparse.Namespace(run=None, model="smollm2-135m", threads=3))
    assert seen == [3]


def test_an_example_is_marked_as_the_score_counts_it():
    """ "18.0" for gold "18" is counted correct by the scoring rule, so the example line must say right."""
    examples = [
        {"id": "a", "question": "q1?", "prediction": "18.0", "gold": "18"},
        {"id": "b", "question": "q2?", "prediction": "17", "gold": "18"},
    ]
    result = {"n": 2, "ppl": 3.0, "ppl_full": 5.0, "tokens": 10, "label": "x", "data": "gsm8k", "split": "test",
              "generation": {"accuracy": 0.5, "ci95": (0.1, 0.9), "n": 2, "correct": 1, "answered": 2,
                             "examples": examples}}  # fmt: skip
    text = format_summary(result)
    assert "predicted 18.0, gold 18 (right)" in text and "predicted 17, gold 18 (wrong)" in text
