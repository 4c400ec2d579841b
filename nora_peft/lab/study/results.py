"""The study's output dir as files: ``results.jsonl`` (one row per finished cell), ``latency.json`` and
``base_reference.json``.

Rows are appended atomically (``nora_peft.io.append_jsonl``) and deduplicated by cell id on read, so a killed study
loses or repeats nothing; a torn last line is ended before the next append and skipped on read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...io import append_jsonl, read_json, read_jsonl, write_json_atomic

RESULTS = "results.jsonl"
LATENCY = "latency.json"
#: the base model without an adapter, evaluated like the cells (written by the runner)
BASE_REFERENCE = "base_reference.json"


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl``, one per cell id (the last row of an id wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(Path(out_dir) / RESULTS):
        if isinstance(row, dict) and "cell_id" in row:
            rows[row["cell_id"]] = row
    return list(rows.values())


def end_torn_line(out_dir: str | Path) -> None:
    """If a crash left a partial last line (no newline) in ``results.jsonl``, end it so the next append starts a fresh
    line; the torn line itself is skipped by ``read_jsonl``."""
    path = Path(out_dir) / RESULTS
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            last = f.read(1)
        if last != b"\n":
            with open(path, "ab") as f:
                f.write(b"\n")


def append_result(out_dir: str | Path, row: dict[str, Any]) -> None:
    """Append one cell's row to ``results.jsonl`` (atomically)."""
    append_jsonl(Path(out_dir) / RESULTS, row)


def read_latency(out_dir: str | Path) -> dict[str, Any] | None:
    """The stored latency measurement (``bench.latency.measure_latency``'s result), or ``None`` if not measured."""
    path = Path(out_dir) / LATENCY
    return read_json(path) if path.exists() else None


def read_base_reference(out_dir: str | Path) -> dict[str, Any] | None:
    """The reference row ``{"model", "split", "datasets": {name: eval result}}``, or ``None`` if not written."""
    path = Path(out_dir) / BASE_REFERENCE
    return read_json(path) if path.exists() else None


def write_latency(out_dir: str | Path, latency: dict[str, Any]) -> None:
    """Store the latency measurement (atomically)."""
    write_json_atomic(Path(out_dir) / LATENCY, latency)
