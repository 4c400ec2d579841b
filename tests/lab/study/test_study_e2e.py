"""A tiny real study on the embedded base: run, interrupt after one cell, resume, report (train/eval/analyze real)."""

from __future__ import annotations

import os

import pytest

from nora_peft.io import read_jsonl
from nora_peft.lab.study.cli import finish_study
from nora_peft.lab.study.runner import read_results, run_study
from nora_peft.lab.study.spec import expand_cells, parse_spec


class Interrupt(Exception):
    pass


@pytest.fixture
def tiny_spec():
    return parse_spec(
        {
            "name": "tiny",
            "datasets": [{"name": "logistic", "data": "logistic", "options": {"n": 60}}],
            "methods": ["lora", "nora"],
            "ranks": [1, 4],
            "seeds": [0],
            "lr": 3e-3,
            "adapter": {"dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 2, "max_length": 192, "save_steps": 1, "logging_steps": 1},
            "eval": {"generate": False, "max_examples": 6, "analysis_samples": 4, "batch_size": 6},
            "latency": {"repeats": 2, "rounds": 2, "seq_len": 16},
            "verdict": {"nora_rank": 1, "lora_rank": 4},
        }
    )


def test_tiny_study_interrupt_resume_report(tiny_spec, tmp_path, default_base_path):
    cells = expand_cells(tiny_spec)
    assert len(cells) == 4

    def stop_after_first(cell, row):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_study(tiny_spec, tmp_path, on_cell_done=stop_after_first, log=lambda m: None)
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 1
    first = tmp_path / "cells" / cells[0].cell_id / "train_summary.json"
    mtime = os.stat(first).st_mtime_ns
    # a crash after a cell's files were written but before its row was appended: the row is rebuilt, not retrained
    (tmp_path / "results.jsonl").write_text("")
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"cell_id": "torn')  # a torn last line is ignored
    seen = []
    run_study(tiny_spec, tmp_path, on_cell_done=lambda c, r: seen.append(c.cell_id), log=lambda m: None)
    assert os.stat(first).st_mtime_ns == mtime  # not retrained
    raw = [r["cell_id"] for r in read_jsonl(tmp_path / "results.jsonl")]
    assert sorted(raw) == sorted(c.cell_id for c in cells)  # every cell exactly once
    assert seen == [c.cell_id for c in cells]
    # a third run does nothing
    run_study(tiny_spec, tmp_path, on_cell_done=lambda c, r: seen.append("again"), log=lambda m: None)
    assert "again" not in seen and len(read_jsonl(tmp_path / "results.jsonl")) == 4
    # the runner only runs cells; the CLI's finish step measures latency and writes the report
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "latency.json").exists()
    finish_study(tiny_spec, tmp_path, log=lambda m: None)

    rows = read_results(tmp_path)
    text = (tmp_path / "report.md").read_text()
    for r in rows:
        assert r["steps"] == 2 and r["params"] > 0 and r["test_ppl"] > 1
        assert r["er_update"] >= 1 - 1e-6 and r["er_output"] <= r["r"] + 1e-6
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {r['cell_id']} "))
        assert f"{r['test_ppl']:.3f}" in line and f"{r['val_ppl']:.3f}" in line
        assert (tmp_path / "cells" / r["cell_id"] / "analysis.json").exists()
    assert (tmp_path / "figures" / "scaling_logistic.png").exists()
    assert (tmp_path / "latency.json").exists() and "Table 3" in text
    # same token budget for both methods at equal steps
    assert len({r["tokens_seen"] for r in rows}) == 1


def test_changed_budget_refuses_to_resume(tiny_spec, tmp_path):
    from nora_peft.lab.study.runner import check_out_dir

    check_out_dir(tiny_spec, tmp_path)
    tiny_spec.train["max_steps"] = 3
    with pytest.raises(ValueError, match="another --out"):
        check_out_dir(tiny_spec, tmp_path)
