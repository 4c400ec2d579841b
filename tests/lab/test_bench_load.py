"""The load generator's pure parts: a seeded, bounded Poisson workload and the latency summary."""

from __future__ import annotations

import statistics

import pytest

from nora_peft.lab.bench.load import Outcome, summarize, workload


class PlainTokenizer:
    chat_template = None


def test_workload_is_seeded_bounded_and_poisson():
    models = ["base", "a", "b"]
    jobs = workload(PlainTokenizer(), models, rate=5.0, duration=200.0, limit=400, quick=False, seed=3)
    again = workload(PlainTokenizer(), models, rate=5.0, duration=200.0, limit=400, quick=False, seed=3)
    assert jobs == again  # the same workload for every policy
    assert len(jobs) == 400  # bounded by count (200 s at 5/s would be ~1000)
    gaps = [b.at - a.at for a, b in zip(jobs, jobs[1:])]
    assert all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.15)  # exponential gaps of mean 1/rate
    assert statistics.stdev(gaps) == pytest.approx(1 / 5.0, rel=0.2)  # ... and an exponential's spread
    assert {j.model for j in jobs} == set(models) and len({j.max_tokens for j in jobs}) == 3
    short = workload(PlainTokenizer(), models, rate=5.0, duration=2.0, limit=400, quick=False, seed=3)
    assert all(j.at < 2.0 for j in short) and len(short) < 30  # bounded by time


def test_summarize_percentiles_errors_and_throughput():
    outcomes = [
        Outcome(ok=True, sent=0.0, first=0.1 * (i + 1), chunks=[0.1 * (i + 1), 0.1 * (i + 1) + 0.02], end=1.0)
        for i in range(10)
    ]
    outcomes.append(Outcome(ok=False, error="HTTP 503", sent=0.5, end=0.6))
    got = summarize(outcomes, wall=2.0, tokens=30)
    assert got["requests"] == 11 and got["errors"] == 1 and got["error_examples"] == ["HTTP 503"]
    assert got["ttft_ms_p50"] == pytest.approx(550.0) and got["ttft_ms_p99"] == pytest.approx(991.0)
    assert got["itl_ms_p50"] == pytest.approx(20.0)
    assert got["throughput_tok_s"] == 15.0 and got["throughput_req_s"] == 5.0


def test_random_adapters_target_what_they_are_told_and_differ(tmp_path):
    """``write_adapters``: ``targets`` (the load bench's ``--targets``) land in each adapter's config, and every
    adapter has its own random weights."""
    import json

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from nora_peft.lab.bench.load import ALL_LINEAR, write_adapters

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    base = LlamaForCausalLM(config)
    names = write_adapters(base, tmp_path / "qv", [4, 4], targets=["q_proj", "v_proj"])
    assert len(names) == 2
    for name in names:
        cfg = json.loads((tmp_path / "qv" / name / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    a, b = (load_file(str(tmp_path / "qv" / n / "adapter_model.safetensors")) for n in names)
    assert a.keys() == b.keys() and all(not a[k].equal(b[k]) for k in a)
    every = write_adapters(base, tmp_path / "all", [4])[0]
    cfg = json.loads((tmp_path / "all" / every / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(ALL_LINEAR)


def test_distinct_adapters_reports_the_work_and_the_read_floor_of_the_weights_it_holds():
    from nora_peft.lab.bench.load import distinct_adapters

    got = distinct_adapters(["q_proj", "v_proj"], rows=3, rank=4, blocks=2, repeats=1)
    # 2 blocks x 3 adapters x r=4 x (576 + 576 for q_proj, 576 + 192 for v_proj) fp32 values
    assert got["weight_mb"] == 2 * 3 * 4 * ((576 + 576) + (576 + 192)) * 4 / 1e6
    assert got["targets"] == ["q_proj", "v_proj"] and got["rows"] == 3
    for key in ("one_adapter_ms", "distinct_ms", "read_once_ms"):
        assert 0 < got[key] < 10_000
