"""The lr probe: probe cells, the choice by validation perplexity, the final cells at the chosen lr, resumption;
the real-model presets parse and expand as the issue asks."""

from __future__ import annotations

import math

import pytest

from nora_peft.io import read_json
from nora_peft.lab.study import probe
from nora_peft.lab.study.results import append_result
from nora_peft.lab.study.spec import expand_cells, load_spec, parse_spec
from nora_peft.lab.study.verdicts import all_verdicts
from nora_peft.methods import AdapterSpec


def probe_spec_raw(**over):
    return {
        "name": "p",
        "datasets": [{"name": "arith", "data": "arith", "options": {"n": 60}}],
        "methods": ["lora", "nora"],
        "ranks": [1, 4],
        "method_ranks": {"nora": [1]},
        "seeds": [0, 1],
        "lr": {"lora": [1e-3, 3e-2], "nora": [1e-3, 3e-2]},
        "probe": {"rank": 4, "max_steps": 3, "max_examples": 6},
        "adapter": {"dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 2, "max_length": 128, "save_steps": 1, "logging_steps": 1},
        "eval": {"generate": False, "max_examples": 6, "analysis": False, "batch_size": 6},
        "latency": {"skip": True},
        "verdict": {"nora_rank": 1, "lora_rank": 4},
        **over,
    }


def test_probe_cells_are_each_method_and_lr_at_one_rank_and_seed():
    spec = parse_spec(probe_spec_raw())
    cells = probe.probe_cells(spec)
    assert sorted((c.method, c.r, c.seed, c.lr) for c in cells) == [
        ("lora", 4, 0, 1e-3), ("lora", 4, 0, 3e-2), ("nora", 4, 0, 1e-3), ("nora", 4, 0, 3e-2)
    ]  # fmt: skip
    assert probe.probe_spec(spec).train["max_steps"] == 3 and not probe.probe_spec(spec).eval_settings()["generate"]


GRID3 = {"lora": [1e-3, 3e-3, 3e-2], "nora": [1e-3, 3e-3, 3e-2]}


def test_choice_is_lowest_validation_perplexity_and_divergence_loses(tmp_path):
    spec = parse_spec(probe_spec_raw(lr=GRID3))
    assert probe.chosen_lrs(spec, tmp_path) is None and probe.resolve(spec, tmp_path) is None
    ppl = {("lora", 1e-3): 9.0, ("lora", 3e-3): 7.0, ("lora", 3e-2): 8.0}
    ppl |= {("nora", 1e-3): 8.5, ("nora", 3e-3): 8.0, ("nora", 3e-2): None}  # None: diverged
    for c in probe.probe_cells(spec):
        append_result(tmp_path / probe.PROBE_DIR, {**c.describe(), "val_ppl": ppl[(c.method, c.lr)]})
    assert probe.probe_grid(spec, tmp_path) == GRID3  # both optima bracketed: no extension
    assert probe.chosen_lrs(spec, tmp_path) == {"lora": 3e-3, "nora": 3e-3}
    final = probe.resolve(spec, tmp_path)
    got = sorted((c.method, c.r, c.seed, c.lr) for c in expand_cells(final))
    assert got == [("lora", r, s, 3e-3) for r in (1, 4) for s in (0, 1)] + [("nora", 1, s, 3e-3) for s in (0, 1)]
    assert final.fingerprint() == spec.fingerprint()  # resuming the final cells is allowed


def test_the_chosen_lr_makes_the_same_step_at_every_rank():
    """Under Adam the branch moves by ~lr * s: LoRA/NoRA (s = alpha/r = 2 at alpha = 2r) keep the probed lr, rsLoRA
    (s = alpha/sqrt(r) = 2 sqrt(r)) gets lr * sqrt(r_probe / r); a fixed alpha changes LoRA's lr instead."""
    spec = parse_spec(probe_spec_raw(methods=["lora", "rslora", "nora"], ranks=[1, 4, 16], method_ranks={},
                                     lr={m: [1e-3] for m in ("lora", "rslora", "nora")}))  # fmt: skip
    final = probe.with_lrs(spec, {"lora": 2e-3, "rslora": 5e-4, "nora": 3e-3})  # probe rank 4
    lrs = {(c.method, c.r): c.lr for c in expand_cells(final)}
    assert [lrs[("lora", r)] for r in (1, 4, 16)] == [2e-3] * 3
    assert [lrs[("nora", r)] for r in (1, 4, 16)] == [3e-3] * 3
    assert [lrs[("rslora", r)] for r in (1, 4, 16)] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    for (method, r), lr in lrs.items():  # the same lr * s at every rank, s from the adapters peft actually builds
        assert lr * AdapterSpec(method=method, r=r).scale == pytest.approx(
            lrs[(method, 4)] * (4 if method == "rslora" else 2)
        )
    fixed = parse_spec(probe_spec_raw(ranks=[1, 4], adapter={"dropout": 0.0, "alpha": 8}))
    got = {(c.method, c.r): c.lr for c in expand_cells(probe.with_lrs(fixed, {"lora": 2e-3, "nora": 2e-3}))}
    assert got[("lora", 1)] == pytest.approx(2e-3 / 4)  # s = 8 at r=1 vs 2 at r=4


def test_best_lr_at_an_edge_extends_the_grid_past_it(tmp_path):
    """LoRA's best at the top of its grid adds 0.3 (= 3e-2 * 3e-2 / 3e-3), then (best again) 3.0; NoRA's best inside
    its grid adds nothing. The choice waits for the extension cells; past MAX_EXTENSIONS the grid stops growing."""
    spec = parse_spec(probe_spec_raw(lr=GRID3))
    ppl = {("lora", 1e-3): 9.0, ("lora", 3e-3): 8.0, ("lora", 3e-2): 7.0}
    ppl |= {("nora", 1e-3): 8.5, ("nora", 3e-3): 8.0, ("nora", 3e-2): 8.2}

    def finish_missing():
        for c in probe.probe_cells(spec, tmp_path):
            if (c.method, c.lr) in ppl and c.cell_id not in {r["cell_id"] for r in _rows(tmp_path)}:
                append_result(tmp_path / probe.PROBE_DIR, {**c.describe(), "val_ppl": ppl[(c.method, c.lr)]})

    finish_missing()
    assert probe.probe_grid(spec, tmp_path) == {"lora": [1e-3, 3e-3, 3e-2, 0.3], "nora": GRID3["nora"]}
    assert probe.chosen_lrs(spec, tmp_path) is None  # lora at 0.3 is not probed yet
    ppl[("lora", 0.3)] = 6.5
    finish_missing()
    assert probe.probe_grid(spec, tmp_path)["lora"] == [1e-3, 3e-3, 3e-2, 0.3, 3.0]
    ppl[("lora", 3.0)] = 6.0  # still best at the edge, but MAX_EXTENSIONS (2) is reached
    finish_missing()
    assert probe.probe_grid(spec, tmp_path)["lora"] == [1e-3, 3e-3, 3e-2, 0.3, 3.0]
    assert probe.chosen_lrs(spec, tmp_path) == {"lora": 3.0, "nora": 3e-3}


def _rows(out):
    from nora_peft.lab.study.results import read_results

    return read_results(out / probe.PROBE_DIR)


def test_probe_spec_errors_name_the_fix():
    with pytest.raises(ValueError, match="one lr per method"):
        parse_spec(probe_spec_raw(lr={"lora": {1: [1e-3], 4: [1e-3]}, "nora": [1e-3]}))
    with pytest.raises(ValueError, match="unknown probe key"):
        parse_spec(probe_spec_raw(probe={"steps": 3}))
    with pytest.raises(ValueError, match="method_ranks"):
        parse_spec(probe_spec_raw(method_ranks={"nora": [2]}))


def test_tiny_probe_study_end_to_end(tmp_path, default_base_path, one_thread):
    """Probe cells train and score; the final cells use the chosen lr; a rerun does nothing new."""
    import argparse

    from nora_peft.lab.study.cli import add_arguments
    from nora_peft.lab.study.cli import main as study_main

    spec_path = tmp_path / "p.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(probe_spec_raw()))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    assert study_main(parser.parse_args([str(spec_path), "--out", str(out), "--jobs", "1", "--no-report"])) == 0
    record = read_json(out / probe.PROBE_FILE)
    chosen, grid = record["chosen"], record["grid"]  # a 2-point grid's best is at an edge: extended at least once
    assert set(chosen) == {"lora", "nora"} and all(chosen[m] in grid[m] and len(grid[m]) >= 3 for m in chosen)
    rows = [r for r in (out / "results.jsonl").read_text().splitlines() if r]
    assert len(rows) == 6  # lora r=1,4 + nora r=1, 2 seeds each
    probe_rows = record["cells"]
    assert len(probe_rows) == sum(map(len, grid.values())) and all(math.isfinite(r["val_ppl"]) for r in probe_rows)
    reference = read_json(out / "base_reference.json")["datasets"]["arith"]  # the base alone, same test records
    assert reference["n"] == 6 and math.isfinite(reference["ppl"])
    cell_eval = read_json(next((out / "cells").glob("*/eval_test.json")))
    assert reference["precision"] == cell_eval["precision"]  # evaluated as the cells are
    mtimes = sorted(p.stat().st_mtime_ns for p in (out / "cells").glob("*/train_summary.json"))
    assert study_main(parser.parse_args([str(spec_path), "--out", str(out), "--jobs", "1", "--no-report"])) == 0
    assert sorted(p.stat().st_mtime_ns for p in (out / "cells").glob("*/train_summary.json")) == mtimes
    _resume_from_copied_files(out, spec_path, lambda o: study_main(parser.parse_args([str(spec_path), "--out", str(o),
                                                                                       "--jobs", "1"])))  # fmt: skip


def _resume_from_copied_files(first, spec_path, run) -> None:
    """The study dir's two small files are what a study interrupted on one machine needs on another: study.json
    records the probe's choice, so nothing is probed or trained again for the rows results.jsonl holds; the report
    is written from them. results.jsonl alone (with a probe) is refused, naming study.json."""
    import shutil

    from nora_peft.lab.study.results import read_results

    assert read_json(first / probe.STUDY_FILE)["probe_lr"] == read_json(first / probe.PROBE_FILE)["chosen"]
    copy = first.parent / "copy"
    copy.mkdir()
    for name in (probe.STUDY_FILE, "results.jsonl", "base_reference.json"):
        shutil.copy(first / name, copy / name)
    assert run(copy) == 0
    assert not (copy / "cells").exists() and not (copy / probe.PROBE_DIR).exists()  # nothing trained or probed
    report = (copy / "report.md").read_text()
    assert all(f"| {r['cell_id']} " in report for r in read_results(first)) and len(read_results(copy)) == 6
    alone = first.parent / "alone"
    alone.mkdir()
    shutil.copy(first / "results.jsonl", alone / "results.jsonl")
    with pytest.raises(ValueError, match=r"copy the study's study.json along with results.jsonl"):
        run(alone)
    assert probe.resolve(load_spec(spec_path), alone) is None


def test_real_presets_parse_and_expand():
    gsm8k = load_spec("gsm8k")
    assert gsm8k.model == "smollm2-135m" and gsm8k.adapter["target_modules"] == ["q_proj", "v_proj"]
    final = probe.with_lrs(gsm8k, {m: 1e-3 for m in gsm8k.methods})
    cells = expand_cells(final)
    assert len(cells) == 24 and {c.seed for c in cells} == {0, 1, 2}
    assert sorted({(c.method, c.r) for c in cells}) == sorted(
        [(m, r) for m in ("lora", "rslora", "nora") for r in (4, 16)] + [("lora", 64), ("rslora", 64)]
    )
    assert gsm8k.verdict_ranks() == (4, 16) and len(probe.probe_cells(gsm8k)) == 9
    full = load_spec("gsm8k-full")
    assert full.ranks == [8, 32, 128, 512] and full.verdict_ranks() == (128, 512)
    assert full.ablations.rank == 128 and full.eval_settings()["max_generate"] == 500
    assert len(expand_cells(full)) == (3 * 4 * 3 + 5 * 3) * 3


def test_paper_preset_adapts_q_and_v_only_as_the_paper():
    """LoRA r=512 on Llama-3-8B's q_proj and v_proj has 218.1M trainable parameters (the paper's Table 3)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nora_peft.methods import AdapterSpec, build_peft_model, count_parameters

    paper = load_spec("paper")
    assert paper.adapter["target_modules"] == ["q_proj", "v_proj"]
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        peft_model = build_peft_model(
            model, AdapterSpec(method="lora", r=512, target_modules=paper.adapter["target_modules"])
        )
    assert round(count_parameters(peft_model)["trainable"] / 1e6, 1) == 218.1


def test_gpu_preset_is_the_issue_s_study():
    """gsm8k-gpu: 3 methods x r = 4..256 x 3 seeds for a full epoch in bf16, the probe as in gsm8k, claim 4's
    ablations at r=64, exact match on 500 test problems and perplexity on all of them, claim 1 at 4x and 16x."""
    gpu, cpu = load_spec("gsm8k-gpu"), load_spec("gsm8k")
    assert gpu.model == "smollm2-135m" and gpu.adapter["target_modules"] == ["q_proj", "v_proj"]
    assert gpu.lr == cpu.lr and gpu.probe["rank"] == cpu.probe["rank"] == 16 and len(probe.probe_cells(gpu)) == 9
    assert gpu.train["epochs"] >= 1 and "max_steps" not in gpu.train and gpu.train["precision"] == "bf16"
    ev = gpu.eval_settings()
    assert ev["max_generate"] >= 500 and ev["max_examples"] is None  # GSM8K's test split has 1,319 records
    cells = expand_cells(probe.with_lrs(gpu, {m: 1e-3 for m in gpu.methods}))
    main = [c for c in cells if c.variant == "default"]
    assert sorted({(c.method, c.r) for c in main}) == sorted((m, r) for m in gpu.methods for r in (4, 16, 64, 256))
    assert len(main) == 36 and {c.seed for c in cells} == {0, 1, 2}
    abl = {c.variant for c in cells if c.variant != "default"}
    assert abl == {"module", "identity", "no-dropout"} and len(cells) == 36 + 9
    assert gpu.verdict_ranks()[0] == 16 and gpu.verdict_lora_ranks() == [64, 256]
    claims = [v.claim for v in all_verdicts(gpu, {}, None) if v.claim.startswith("(1)")]
    assert claims == [f"(1) NoRA r=16 <= {m} r={r} in test PPL" for r in (64, 256) for m in ("lora", "rslora")]
