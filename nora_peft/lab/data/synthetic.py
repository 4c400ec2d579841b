"""Reasoning tasks the project generates itself: exact answers, chain-of-thought responses, deterministic per seed.

* ``arith``: multi-step arithmetic word problems. The response works one step per line and ends with
  ``The answer is N.``
* ``logistic``: iterate the logistic map ``x_{n+1} = r * x_n * (1 - x_n)`` (the NoRA paper's Table 1). Every value is
  rounded to 4 decimals *before* the next step, so the chain of thought is exact and checkable::

      x1 = 0.9245
      x2 = 0.2587
      ...
      The answer is 0.6190.

  :func:`parse_logistic_steps` reads the values back (for per-step error and state-collapse detection).
"""

from __future__ import annotations

import random
import re

from ...bases.embedded import ITEMS, NAMES  # the base was pretrained on this vocabulary


def _arith_problem(rng: random.Random, steps: int) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friend = rng.choice([n for n in NAMES if n != name])
    value = rng.randint(5, 40)
    story = [f"{name} has {value} {item}."]
    work = []
    for _ in range(steps):
        op = rng.choice(["buy", "give", "double", "find", "share"])
        if op == "buy":
            k, m = rng.randint(2, 6), rng.randint(2, 9)
            story.append(f"Then {name} buys {k} boxes with {m} {item} each.")
            work.append(f"{name} buys {k} * {m} = {k * m} {item}, so {value} + {k * m} = {value + k * m}.")
            value += k * m
        elif op == "give" and value > 2:
            g = rng.randint(1, value - 1)
            story.append(f"Then {name} gives {g} {item} to {friend}.")
            work.append(f"After giving {g} away: {value} - {g} = {value - g}.")
            value -= g
        elif op == "double" and value < 200:
            story.append(f"Then the number of {item} {name} has doubles.")
            work.append(f"Doubling: {value} * 2 = {value * 2}.")
            value *= 2
        elif op == "share" and any(value % n == 0 for n in (2, 3, 4, 5)):
            n = rng.choice([n for n in (2, 3, 4, 5) if value % n == 0])
            story.append(f"Then {name} splits the {item} equally into {n} piles and keeps one pile.")
            work.append(f"One of {n} equal piles: {value} / {n} = {value // n}.")
            value //= n
        else:
            f = rng.randint(1, 20)
            story.append(f"Then {name} finds {f} more {item}.")
            work.append(f"Finding {f} more: {value} + {f} = {value + f}.")
            value += f
    prompt = " ".join(story) + f" How many {item} does {name} have now?"
    response = "\n".join(work) + f"\nThe answer is {value}."
    return prompt, response, value


def arithmetic_problems(n: int = 2000, seed: int = 0, min_steps: int = 2, max_steps: int = 4) -> list[dict]:
    """``n`` arithmetic word problems with ``min_steps``..``max_steps`` operations each."""
    rng = random.Random(f"arith-{seed}")
    records = []
    for i in range(n):
        prompt, response, value = _arith_problem(rng, rng.randint(min_steps, max_steps))
        records.append({"id": f"arith-{seed}-{i}", "prompt": prompt, "response": response, "answer": str(value)})
    return records


def logistic_orbit(r: float, x0: float, steps: int) -> list[float]:
    """The orbit ``x1..x_steps`` with every value rounded to 4 decimals before the next step."""
    xs, x = [], x0
    for _ in range(steps):
        x = round(r * x * (1 - x), 4)
        xs.append(x)
    return xs


def logistic_map_problems(
    n: int = 2000, seed: int = 0, min_steps: int = 3, max_steps: int = 6, r_range: tuple[float, float] = (2.8, 3.95)
) -> list[dict]:
    """``n`` logistic-map iteration tasks; ``r`` in ``r_range`` (mostly chaotic above 3.57)."""
    rng = random.Random(f"logistic-{seed}")
    records = []
    for i in range(n):
        r = round(rng.uniform(*r_range), 2)
        x0 = round(rng.uniform(0.05, 0.95), 3)
        steps = rng.randint(min_steps, max_steps)
        xs = logistic_orbit(r, x0, steps)
        prompt = (
            f"Iterate the logistic map x(n+1) = r * x(n) * (1 - x(n)) with r = {r:.2f} and x0 = {x0:.3f} "
            f"for {steps} steps, rounding each value to 4 decimals."
        )
        lines = [f"x{j + 1} = {x:.4f}" for j, x in enumerate(xs)]
        response = "\n".join(lines) + f"\nThe answer is {xs[-1]:.4f}."
        records.append(
            {
                "id": f"logistic-{seed}-{i}",
                "prompt": prompt,
                "response": response,
                "answer": f"{xs[-1]:.4f}",
                "r": r,
                "x0": x0,
                "steps": steps,
            }
        )
    return records


_STEP = re.compile(r"x(\d+)\s*=\s*(-?\d*\.\d+|-?\d+)")


def parse_logistic_steps(text: str) -> list[float]:
    """The values ``x1, x2, ...`` a logistic-map response states, in order (stops at the first gap)."""
    values: dict[int, float] = {}
    for idx, val in _STEP.findall(text):
        values.setdefault(int(idx), float(val))
    out = []
    for i in range(1, len(values) + 1):
        if i not in values:
            break
        out.append(values[i])
    return out


def parse_logistic_prompt(prompt: str) -> tuple[float, float, int] | None:
    """``(r, x0, steps)`` from a logistic-map prompt, or ``None``."""
    m = re.search(r"r = ([\d.]+) and x0 = ([\d.]+) for (\d+) steps", prompt)
    return (float(m.group(1)), float(m.group(2)), int(m.group(3))) if m else None


def reasoning_mix(n: int = 2000, seed: int = 0, logistic_fraction: float = 0.5, **kwargs) -> list[dict]:
    """A deterministic mix of arithmetic and logistic-map problems, shuffled."""
    n_log = int(round(n * logistic_fraction))
    records = arithmetic_problems(n - n_log, seed=seed) + logistic_map_problems(n_log, seed=seed)
    random.Random(f"mix-{seed}").shuffle(records)
    return records
