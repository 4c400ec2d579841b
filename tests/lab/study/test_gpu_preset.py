"""``nora study gsm8k-gpu`` end to end on the CPU at a tiny size: the preset's every cell kind (probe, 3 methods x
4 ranks, the r=64 ablations, the base row, latency, report) runs, and what a GPU run copies off the machine is small."""

from __future__ import annotations

import argparse

import pytest

from nora_peft.io import read_json
from nora_peft.lab.study import cli
from nora_peft.lab.study.results import read_results

#: the preset at a CPU size: 2 steps of 2 records, 1 seed, 4 records scored, 2 problems generated (docs/study-gpu.md)
DRY_RUN = [
    "--max-steps", "2", "--set", "seeds=[0]", "--set", "train.batch_size=2", "--set", "train.max_train_examples=16",
    "--set", "train.val_size=8", "--set", "eval.max_examples=4", "--set", "eval.max_generate=2",
    "--set", "eval.max_new_tokens=8", "--set", "eval.batch_size=4", "--set", "eval.analysis_samples=2",
    "--set", "probe.max_examples=4", "--set", "latency.repeats=2", "--set", "latency.rounds=2",
    "--set", "latency.seq_len=16", "--set", "latency.decode_tokens=2",
]  # fmt: skip
#: what a GPU run copies off the machine (docs/study-gpu.md): small files, no run dirs
PORTABLE = ("study.json", "probe.json", "results.jsonl", "base_reference.json", "latency.json", "verdicts.json",
            "report.md")  # fmt: skip


@pytest.mark.slow
def test_gsm8k_gpu_preset_dry_run_on_the_cpu(tmp_path, smollm2_path, gsm8k_dir, one_thread):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "study"
    assert cli.main(parser.parse_args(["gsm8k-gpu", "--out", str(out), "--jobs", "1", *DRY_RUN])) == 0
    rows = read_results(out)
    main = sorted((r["method"], r["r"]) for r in rows if r["variant"] == "default")
    assert main == sorted((m, r) for m in ("lora", "nora", "rslora") for r in (4, 16, 64, 256))
    assert sorted(r["variant"] for r in rows if r["variant"] != "default") == ["identity", "module", "no-dropout"]
    assert all(r["steps"] == 2 and r["test"]["n"] == 4 and r["test"]["generation_n"] == 2 for r in rows)
    assert all(r["test_ppl"] > 1 and r["curves"]["update"]["normalized_singular_values_mean"] for r in rows)
    assert len(read_json(out / "probe.json")["cells"]) >= 9 and read_json(out / "study.json")["probe_lr"]
    claim1 = [v for v in read_json(out / "verdicts.json") if v["claim"].startswith("(1)")]
    assert [v["claim"].split()[-4] for v in claim1] == ["r=64", "r=64", "r=256", "r=256"]
    assert read_json(out / "latency.json")["rank"] == 16 and (out / "figures" / "scaling_gsm8k.png").is_file()
    size = sum((out / name).stat().st_size for name in PORTABLE)
    size += sum(p.stat().st_size for p in (out / "figures").iterdir())
    assert size < 4 << 20, f"{size:,} bytes to copy off the machine"
