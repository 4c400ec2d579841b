"""The base's perplexity beside the adapter's: equal to the base model loaded on its own, computed once per base and
records (then read from the cache), shown in the summary."""

from __future__ import annotations

import os

import pytest
import torch

from nora_peft.lab import eval as ev
from nora_peft.lab.eval import base_reference
from nora_peft.lab.eval.loading import load_base
from tests.lab.eval.test_evaluate import loaded, own_cache, runs, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_base_perplexity_equals_the_base_loaded_alone_and_is_cached(loaded, tiny, monkeypatch):  # noqa: F811
    model, tokenizer, cfg, splits = loaded
    records = splits["test"][:5]
    got = ev.base_perplexity(model, tokenizer, records, base_name=tiny, max_length=cfg.max_length)
    base, _ = load_base(tiny, "fp32")  # an independent reference: the base folder, no peft at all
    alone = ev.perplexities(base, tokenizer, records, max_length=cfg.max_length)
    assert got["ppl"] == pytest.approx(alone["response"]["ppl"], rel=1e-6) and got["cached"] is False
    assert got["ppl_full"] == pytest.approx(alone["full"]["ppl"], rel=1e-6)
    adapted = ev.perplexity(model, tokenizer, records, max_length=cfg.max_length)
    assert adapted["ppl"] != pytest.approx(got["ppl"], rel=1e-6)  # the adapter is back on after

    def no_forward(*a, **k):
        raise AssertionError("the cached base perplexity was computed again")

    monkeypatch.setattr(base_reference, "perplexities", no_forward)
    again = ev.base_perplexity(model, tokenizer, records, base_name=tiny, max_length=cfg.max_length)
    assert again["cached"] is True and again["ppl"] == got["ppl"]


def test_the_cache_key_follows_the_base_the_records_and_the_settings(loaded, tiny, tmp_path):  # noqa: F811
    _, _, _, splits = loaded
    recs = splits["test"][:3]
    key = base_reference.cache_path(tiny, recs, max_length=256, precision="fp32")
    assert key == base_reference.cache_path(tiny, [dict(r) for r in recs], max_length=256, precision="fp32")
    changed = [{**recs[0], "response": recs[0]["response"] + " 1"}, *recs[1:]]  # same ids, other content
    others = [
        base_reference.cache_path(tiny, recs[:2], max_length=256, precision="fp32"),
        base_reference.cache_path(tiny, changed, max_length=256, precision="fp32"),
        base_reference.cache_path(tiny, recs, max_length=128, precision="fp32"),
        base_reference.cache_path(tiny, recs, max_length=256, precision="bf16"),
        base_reference.cache_path(tiny, recs, max_length=256, precision="fp32", weights_dtype="torch.bfloat16"),
    ]
    assert key not in others and len(set(others)) == len(others)
    weights = next(p for p in os.scandir(tiny) if p.name.endswith(".safetensors"))
    before = base_reference.base_fingerprint(tiny)
    os.utime(weights.path, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a rebuilt base
    assert base_reference.base_fingerprint(tiny) != before


def test_evaluate_run_and_the_summary_show_the_base(runs):  # noqa: F811
    result = ev.evaluate_run(runs["nora"], split="test", max_examples=4, generate=False)
    base = result["base"]
    assert base["tokens"] == result["tokens"] and base["ppl"] > 0
    text = ev.format_summary(result)
    assert f"response {ev.significant(result['ppl'])} (base {ev.significant(base['ppl'])})" in text
    assert ev.evaluate_run(runs["nora"], split="test", max_examples=4, generate=False)["base"]["cached"] is True
    plain = ev.evaluate_run(runs["nora"], split="test", max_examples=4, generate=False, base_reference=False)
    assert "base" not in plain and "(base" not in ev.format_summary(plain)


def test_base_perplexity_needs_a_model_whose_adapter_can_be_switched_off(tiny):  # noqa: F811
    base, tokenizer = load_base(tiny, "fp32")
    records = [{"id": "x", "prompt": "1 + 1?", "response": "2", "answer": "2"}]
    with pytest.raises(TypeError, match="peft model"):
        ev.base_perplexity(base, tokenizer, records, base_name=tiny, max_length=64)
    assert torch.is_grad_enabled()
