"""The study: a spec (YAML or preset) -> cells -> run dirs -> ``results.jsonl`` -> ``report.md`` with verdicts.

``nora study demo`` runs the scaled-down preset on the embedded base; ``nora study paper`` is the paper's setup
(Llama-3-8B, SlimOrca + MathInstruct) for machines with GPUs. See ``docs/study.md``.
"""

from .report import write_report
from .runner import read_results, run_study
from .spec import Cell, StudySpec, expand_cells, load_spec, parse_spec, shard_cells

__all__ = [
    "Cell",
    "StudySpec",
    "expand_cells",
    "load_spec",
    "parse_spec",
    "read_results",
    "run_study",
    "shard_cells",
    "write_report",
]
