"""Synthetic tasks: deterministic, answers recomputed independently, logistic-map values parse back."""

from __future__ import annotations

import re

from nora_peft.lab.data import (
    arithmetic_problems,
    extract_answer,
    logistic_map_problems,
    parse_logistic_prompt,
    parse_logistic_steps,
    reasoning_mix,
)


def test_deterministic_per_seed_and_different_across_seeds():
    assert arithmetic_problems(50, seed=3) == arithmetic_problems(50, seed=3)
    assert arithmetic_problems(50, seed=3) != arithmetic_problems(50, seed=4)
    assert logistic_map_problems(50, seed=1) == logistic_map_problems(50, seed=1)
    assert [r["id"] for r in reasoning_mix(40, seed=0)] == [r["id"] for r in reasoning_mix(40, seed=0)]


def test_arithmetic_answers_recomputed_from_the_worked_lines():
    for rec in arithmetic_problems(300, seed=7):
        lines = rec["response"].splitlines()
        assert lines[-1] == f"The answer is {rec['answer']}."
        value = None
        for line in lines[:-1]:
            for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", line):
                a, b, c = int(a), int(b), int(c)
                assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
                value = c
        assert value == int(rec["answer"]) and extract_answer(rec["response"]) == rec["answer"]
        assert rec["prompt"].endswith("have now?")


def test_logistic_answers_recomputed_in_float64():
    for rec in logistic_map_problems(300, seed=2):
        r, x, steps = parse_logistic_prompt(rec["prompt"])
        assert (r, x, steps) == (rec["r"], rec["x0"], rec["steps"])
        expected = []
        for _ in range(steps):
            x = round(r * x * (1.0 - x), 4)
            expected.append(x)
        assert parse_logistic_steps(rec["response"]) == expected
        assert rec["answer"] == f"{expected[-1]:.4f}"
        assert extract_answer(rec["response"]) == str(float(rec["answer"]))


def test_parse_logistic_steps_stops_at_a_gap_and_ignores_noise():
    assert parse_logistic_steps("x1 = 0.5000\nx2 = 0.25\nx4 = 0.1") == [0.5, 0.25]
    assert parse_logistic_steps("no values here") == []


def test_mix_contains_both_tasks():
    ids = [r["id"] for r in reasoning_mix(100, seed=0)]
    assert sum(i.startswith("arith") for i in ids) == 50 and sum(i.startswith("logistic") for i in ids) == 50
