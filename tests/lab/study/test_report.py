"""The report from synthetic results: files exist, numbers equal results.jsonl, the ceiling sentence appears."""

from __future__ import annotations

from nora_peft.io import append_jsonl, read_json
from nora_peft.lab.study.report import write_report
from nora_peft.lab.study.results import read_results

from .synthetic import small_spec, synthetic_rows


def _write(tmp_path, spec, ppl, er=None):
    for row in synthetic_rows(spec, ppl, er):
        append_jsonl(tmp_path / "results.jsonl", row)
    return write_report(spec, tmp_path, log=lambda m: None)


def test_report_numbers_match_results(tmp_path):
    spec = small_spec()

    def ppl(c):
        v = {"lora": 10.0, "rslora": 9.5, "nora": 9.0}[c.method] - 0.1 * c.r**0.5 + 0.037 * c.seed + c.lr * 10
        return v + 0.01, v

    path = _write(tmp_path, spec, ppl, lambda c: 0.5 * c.r)
    text = path.read_text()
    rows = read_results(tmp_path)
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| reasoning_")}
    assert set(lines) == {r["cell_id"] for r in rows}  # one line per cell, no more
    for r in rows:
        assert f"{r['test_ppl']:.3f}" in lines[r["cell_id"]] and f"{r['val_ppl']:.3f}" in lines[r["cell_id"]]
    # the scaling table shows mean +- CI over the 3 seeds at the validation-selected lr
    import numpy as np

    sel = [r for r in rows if r["method"] == "nora" and r["r"] == 32 and r["variant"] == "default"]
    assert f"{np.mean([r['test_ppl'] for r in sel]):.3f} ± " in text
    for name in ("scaling_reasoning.png", "effective_rank_output_reasoning.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in text
    verdicts = read_json(tmp_path / "verdicts.json")
    assert {v["claim"][:3] for v in verdicts} == {"(1)", "(2)", "(3)", "(4)", "(5)"}
    assert "## Verdicts" in text and "Table 2" in text


def test_report_says_when_the_demo_cannot_test_a_ceiling(tmp_path):
    spec = small_spec(seeds=[0, 1])
    path = _write(tmp_path, spec, lambda c: (9.0 + 0.3 * c.seed * (-1) ** c.r, 9.0 + 0.3 * c.seed * (-1) ** (c.r // 2)))
    assert "this study cannot test a linear ceiling" in path.read_text()


def test_report_only_reads_it_never_measures_latency(tmp_path, monkeypatch):
    """Without a stored latency.json the report says claim (5) is not tested; it loads no model and measures nothing."""
    import nora_peft.bases.named as models

    def no_model(*a, **k):
        raise AssertionError("the report must not load a model")

    monkeypatch.setattr(models, "load_model_and_tokenizer", no_model)
    spec = small_spec(latency={"rank": 8, "repeats": 2, "rounds": 2})
    path = _write(tmp_path, spec, lambda c: (9.0, 9.0))
    assert not (tmp_path / "latency.json").exists()
    claim5 = next(v for v in read_json(tmp_path / "verdicts.json") if v["claim"].startswith("(5)"))
    assert claim5["verdict"] == "not tested" and "Table 3" not in path.read_text()


def _latency_rounds(nora_ms: list[float], rate: str) -> list[list[dict]]:
    return [
        [
            {"label": "base", "ms": 10.0, "rel_latency": 1.0, rate: 100.0, "method": "base", "r": 0, "merged": False},
            {"label": "lora-r8", "ms": 12.0, "rel_latency": 1.2, rate: 80.0, "method": "lora", "r": 8, "merged": False},
            {"label": "lora-r8-merged", "ms": 10.0, "rel_latency": 1.0, rate: 100.0, "method": "lora", "r": 8}
            | {"merged": True},
            {"label": "nora-r8", "ms": ms, "rel_latency": ms / 10, rate: 1000 / ms, "method": "nora", "r": 8}
            | {"merged": False},
        ]
        for ms in nora_ms
    ]


def test_report_shows_stored_prefill_and_decode_latency(tmp_path):
    from nora_peft.lab.study.results import write_latency

    spec = small_spec(latency={"rank": 8})
    write_latency(
        tmp_path,
        {
            "rank": 8,
            "model": "smollm2-135m",
            "cells_model": False,  # measured on another model than the cells': no params / PPL pairing
            "rounds": _latency_rounds([10.5, 10.6, 10.4], "tokens_per_s"),
            "decode_rounds": _latency_rounds([11.0, 11.0, 11.0], "decode_tokens_per_s"),
            "setting": "prefill setting",
            "decode_setting": "decode setting",
        },
    )
    text = _write(tmp_path, spec, lambda c: (9.0, 9.0)).read_text()
    assert "## Efficiency (Table 3)" in text and "`smollm2-135m`" in text and "decode setting" in text
    assert "generated tokens/s" in text  # the decode table
    assert "| nora-r8 | - | - |" in text
    assert "vs merged LoRA: 0.050 ± " in text and "vs merged LoRA: 0.100" in text  # prefill, then decode overhead
    claim5 = next(v for v in read_json(tmp_path / "verdicts.json") if v["claim"].startswith("(5)"))
    assert claim5["verdict"] == "holds" and "Decode: NoRA (unmerged) vs merged LoRA: +10.0%" in claim5["evidence"]


def test_report_shows_the_base_reference_row(tmp_path):
    from nora_peft.io import write_json_atomic

    write_json_atomic(
        tmp_path / "base_reference.json",
        {"model": "m", "split": "test", "datasets": {"reasoning": {"ppl": 12.345, "accuracy": 0.125}}},
    )
    text = _write(tmp_path, small_spec(), lambda c: (9.0, 9.0)).read_text()
    assert "| base (no adapter) | - | - | 0 | - | 12.345 | 0.125 | - |" in text


def test_report_sums_the_cells_wall_times(tmp_path):
    spec = small_spec()
    rows = synthetic_rows(spec, lambda c: (10.0, 10.0))
    for i, row in enumerate(rows):
        row["cell_wall_s"] = 60.0 * (i + 1)
        append_jsonl(tmp_path / "results.jsonl", row)
    text = write_report(spec, tmp_path, log=lambda m: None).read_text()
    n = len(rows)
    total_h = 60.0 * n * (n + 1) / 2 / 3600
    assert f"{n} cells, {total_h:.2f} h in all, median {(n // 2 + 1):.1f} min" in text


def test_spectral_figures_need_only_the_rows(tmp_path):
    """A results.jsonl copied without its run dirs still draws the spectra: the rows keep the curves."""
    from nora_peft.lab.study.runner import spectral_curves

    spec = small_spec()
    update = {"normalized_singular_values_mean": [1.0, 0.5123456, 0.25], "cumulative_energy_mean": [0.7, 0.9, 1.0]}
    output = {"cumulative_energy_mean": [0.6, 0.95, 1.0]}
    analysis = {"aggregate": {"update": update, "output": output, "latent": {"x": [1]}}}
    curves = spectral_curves(analysis)
    assert curves["update"]["normalized_singular_values_mean"] == [1.0, 0.5123, 0.25] and "latent" not in curves
    for row in synthetic_rows(spec, lambda c: (9.0, 9.0)):
        append_jsonl(tmp_path / "results.jsonl", {**row, "run_dir": str(tmp_path / "gone"), "curves": curves})
    text = write_report(spec, tmp_path, log=lambda m: None).read_text()
    for name in ("spectrum_reasoning_r32.png", "energy_reasoning_r32.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000 and f"figures/{name}" in text
