"""Data: synthetic reasoning tasks, loaders for real data sets, formatting with response-only labels, splits.

Every source yields records ``{"id": str, "prompt": str, "response": str, "answer": str | None}``.
"""

from .formatting import (
    PLAIN_TEMPLATE,
    answer_is_complete,
    answers_match,
    build_lm_dataset,
    describe_splits,
    extract_answer,
    format_example,
    format_prompt,
    make_splits,
    normalize_answer,
)
from .loaders import GSM8K_INSTRUCTION, load_source, normalize_number
from .synthetic import (
    arithmetic_problems,
    logistic_map_problems,
    logistic_orbit,
    parse_logistic_prompt,
    parse_logistic_steps,
    reasoning_mix,
)

__all__ = [
    "GSM8K_INSTRUCTION",
    "PLAIN_TEMPLATE",
    "answer_is_complete",
    "answers_match",
    "arithmetic_problems",
    "build_lm_dataset",
    "describe_splits",
    "extract_answer",
    "format_example",
    "format_prompt",
    "load_source",
    "logistic_map_problems",
    "logistic_orbit",
    "make_splits",
    "normalize_answer",
    "normalize_number",
    "parse_logistic_prompt",
    "parse_logistic_steps",
    "reasoning_mix",
]
