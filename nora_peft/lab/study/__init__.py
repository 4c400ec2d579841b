"""The study: a spec (YAML or preset) -> cells -> run dirs -> ``results.jsonl`` -> latency step -> ``report.md``.

Rooms: ``spec`` (parse, expand, shard), ``runner`` (cells), ``results`` (the output dir's files), ``latency`` (the
claim-5 step, run by the CLI), ``stats`` / ``verdicts`` / ``figures`` / ``report`` (reading only), ``cli``.
``nora study demo`` runs the scaled-down preset on the embedded base; ``nora study paper`` is the paper's setup
(Llama-3-8B, SlimOrca + MathInstruct) for machines with GPUs. See ``docs/study.md``.
"""

from .cli import finish_study
from .report import write_report
from .results import read_results
from .runner import run_study
from .spec import Cell, StudySpec, expand_cells, load_spec, parse_spec, shard_cells

__all__ = [
    "Cell",
    "StudySpec",
    "expand_cells",
    "finish_study",
    "load_spec",
    "parse_spec",
    "read_results",
    "run_study",
    "shard_cells",
    "write_report",
]
