"""``nora bench`` smoke test: it runs every section on tiny sizes and emits valid JSON (no timing assertions)."""

from __future__ import annotations

import json

import torch

from nora_peft.cli import main as cli_main
from nora_peft.lab.bench import latency_table, saved_activation_bytes, small_llama
from nora_peft.methods import AdapterSpec


def test_nora_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--quick", "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"meta", "train", "infer", "mixed"} <= set(results)
    train = results["train"][0]
    assert train["lora_ms"] > 0 and train["nora_ms"] > 0 and train["mem_ratio_nora_over_lora"] > 0
    labels = [row["label"] for row in results["infer"]["prefill_b1"]]
    assert labels[0] == "base" and {"lora-r8", "lora-r8-merged", "nora-r8"} <= set(labels)
    assert [row["n_adapters"] for row in results["mixed"]] == [1, 4]
    assert "training step" in capsys.readouterr().out


def test_latency_table_rows():
    model = small_llama(hidden=32, layers=1, vocab=64)
    rows = latency_table(model, [AdapterSpec(method="nora", r=4)], seq_len=8, repeats=2, warmup=1)
    assert [r["label"] for r in rows] == ["base", "nora-r4"]
    assert rows[0]["rel_latency"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert not any("nora" in n for n, _ in model.named_modules())  # the caller's model is left untouched


def test_saved_activation_bytes_counts_unique_storages():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    # tanh saves its output (4*8 floats); x is a leaf the matmul saves too -> 2 unique storages of 128 bytes
    got = saved_activation_bytes(lin, lambda: torch.tanh(lin(x)).sum())
    assert got == 2 * 4 * 8 * 4
