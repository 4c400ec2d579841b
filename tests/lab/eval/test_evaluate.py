"""``nora eval``: perplexity against a per-token reference, batched generation, answer and logistic-map scoring,
run dirs, the CLI and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nora_peft.io import read_json, write_json_atomic
from nora_peft.lab import eval as ev
from nora_peft.lab.data import build_lm_dataset, format_example, format_prompt, logistic_map_problems
from nora_peft.lab.eval.cli import slug
from nora_peft.lab.eval.summary import significant
from nora_peft.lab.stats import wilson_interval
from nora_peft.lab.train import train
from tests.lab.test_train import make_tiny_model_dir, small_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """The base perplexities these tests cache go to a folder of their own, not the user's cache."""
    monkeypatch.setenv("NORA_CACHE", str(tmp_path_factory.getbasetemp() / "nora_cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_eval"))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """A NoRA and a LoRA run on the reasoning mix (arithmetic + logistic-map records)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for method in ("nora", "lora"):
        adapter = {"method": method, "r": 4}
        cfg = small_config(tiny, root / method, data="reasoning", data_options={"n": 60}, max_steps=3, adapter=adapter)
        out[method] = train(cfg)
    return out


@pytest.fixture(scope="module")
def loaded(runs):
    return ev.load_run(runs["nora"])


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------
def _reference_nll(model, dataset) -> tuple[float, int]:
    """Sum of -log p over labelled tokens, one unpadded example at a time, log-softmax in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    total -= logp[t - 1, labels[t]].item()
                    count += 1
    return total, count


@pytest.mark.parametrize("response_only", [True, False])
def test_perplexity_matches_per_token_reference(loaded, response_only):
    model, tokenizer, cfg, splits = loaded
    records = splits["test"][:5]
    got = ev.perplexity(model, tokenizer, records, max_length=cfg.max_length, batch_size=3, response_only=response_only)
    dataset, _ = build_lm_dataset(records, tokenizer, max_length=cfg.max_length, response_only=response_only)
    total, count = _reference_nll(model, dataset)
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_response_only_counts_exactly_the_response_tokens(loaded):
    model, tokenizer, _, splits = loaded
    records = splits["test"][:4]
    got = ev.perplexity(model, tokenizer, records, max_length=4096, batch_size=4)
    # independent count: the response text (+ eos) tokenized on its own, every token after the prompt scored
    expected = sum(
        len(tokenizer(format_example(tokenizer, r)[1], add_special_tokens=False)["input_ids"]) for r in records
    )
    assert got["tokens"] == expected
    full = ev.perplexity(model, tokenizer, records, max_length=4096, batch_size=4, response_only=False)
    assert full["tokens"] > got["tokens"]


def test_perplexity_does_not_depend_on_batch_size(loaded):
    model, tokenizer, _, splits = loaded
    a = ev.perplexity(model, tokenizer, splits["test"], batch_size=1)
    b = ev.perplexity(model, tokenizer, splits["test"], batch_size=6)
    assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_ids_are_what_training_sees(loaded):
    _, tokenizer, _, splits = loaded
    rec = splits["test"][0]
    ids = ev.prompt_ids(tokenizer, [rec])[0]
    expected = [tokenizer.bos_token_id] + tokenizer(format_prompt(tokenizer, rec["prompt"]), add_special_tokens=False)[
        "input_ids"
    ]
    assert ids == expected


def test_batched_left_padded_generation_equals_one_at_a_time(loaded):
    model, tokenizer, _, splits = loaded
    records = splits["test"][:5]  # prompts of different lengths -> real left padding
    assert len({len(p) for p in ev.prompt_ids(tokenizer, records)}) > 1
    batched = ev.generate(model, tokenizer, records, max_new_tokens=10, batch_size=5)
    single = [ev.generate(model, tokenizer, [r], max_new_tokens=10, batch_size=1)[0] for r in records]
    assert batched == single
    assert model.config._attn_implementation == "sdpa"  # the folded decode attention was for the generation only
    assert tokenizer.padding_side == "right"  # left untouched for training


def test_generation_equals_transformers_generate_one_at_a_time(loaded):
    """The hand-written decode loop (rows leave the batch as they finish) against ``model.generate`` on each prompt
    alone, unpadded: the same greedy tokens up to EOS."""
    model, tokenizer, _, splits = loaded
    records = splits["test"][:6]
    ours = ev.generate(model, tokenizer, records, max_new_tokens=12, batch_size=4, stop_at_answer=False)
    for rec, text in zip(records, ours):
        ids = torch.tensor([ev.prompt_ids(tokenizer, [rec])[0]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert text == tokenizer.decode(new, skip_special_tokens=True)


def test_early_stop_per_row_equals_one_at_a_time_and_the_cut_full_output(loaded, monkeypatch):
    """Rows stop at different steps; each row's text is what it generates alone, and what the full (no early stop)
    generation gives, cut at the first prefix where the stop rule holds."""
    model, tokenizer, _, splits = loaded
    records = splits["test"][:6]
    full = [ev.generate(model, tokenizer, [r], max_new_tokens=24, batch_size=1, stop_at_answer=False)[0]
            for r in records]  # fmt: skip
    # a stand-in for "the #### line is complete" that this random model does hit, at different steps per row
    marks = sorted({c for text in full for c in text[2:12] if c.strip()})[:3]
    assert marks
    monkeypatch.setattr("nora_peft.lab.data.answer_is_complete", lambda text: any(c in text for c in marks))

    def cut(text: str) -> str:  # the shortest token prefix of the full output where the rule holds
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for j in range(1, len(ids) + 1):
            prefix = tokenizer.decode(ids[:j], skip_special_tokens=True)
            if any(c in prefix for c in marks):
                return prefix
        return text

    stats: dict = {}
    batched = ev.generate(model, tokenizer, records, max_new_tokens=24, batch_size=4, stats=stats)
    single = [ev.generate(model, tokenizer, [r], max_new_tokens=24, batch_size=1)[0] for r in records]
    assert batched == single == [cut(t) for t in full]
    assert len({len(t) for t in batched}) > 1 and stats["stopped_at_answer"] >= 2  # rows really stopped apart
    assert sum(stats[k] for k in ("stopped_at_answer", "stopped_at_eos", "hit_max_new_tokens")) == len(records)


def test_score_answers_exact_match_and_wilson_interval():
    records = [
        {"id": "a", "prompt": "6 times 7?", "answer": "42"},
        {"id": "b", "prompt": "3 + 4?", "answer": "7"},
        {"id": "c", "prompt": "3 / 2?", "answer": "1.5"},
        {"id": "d", "prompt": "?", "answer": None},
        {"id": "e", "prompt": "1000 + 234.5?", "answer": "1234.5"},
    ]
    outputs = ["6 * 7 = 42\n#### 42", "so 7, or maybe 8\n#### 8", "so 1.50\nThe answer is 1.50.", "anything",
               "1000 + 234.5 = $1,234.50"]  # fmt: skip
    got = ev.score_answers(records, outputs)
    assert (got["n"], got["correct"], got["answered"]) == (4, 2, 3) and got["accuracy"] == pytest.approx(0.5)
    assert got["accuracy_last_number"] == pytest.approx(0.75)  # "e" has its number but no answer line
    assert got["examples"][1] == {"id": "b", "question": "3 + 4?", "prediction": "8", "gold": "7",
                                  "output": outputs[1]}  # fmt: skip
    lo, hi = got["ci95"]
    assert lo == pytest.approx(wilson_interval(2, 4)[0]) and lo < 0.5 < hi


def test_generation_accuracy_scores_what_the_model_says(loaded, monkeypatch):
    model, tokenizer, _, splits = loaded
    records = [r for r in splits["test"] if r["answer"] is not None][:6]
    # a model that answers the first half right (its reference response) and the rest wrong
    fake = [r["response"] if i < 3 else "#### -1" for i, r in enumerate(records)]
    monkeypatch.setattr("nora_peft.lab.eval.generation.generate", lambda *a, **k: fake)
    got = ev.generation_accuracy(model, tokenizer, records)
    assert (got["n"], got["correct"], got["accuracy"]) == (6, 3, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Logistic map
# ---------------------------------------------------------------------------------------------------------------
def test_logistic_scoring_errors_and_collapse():
    recs = [r for r in logistic_map_problems(40, seed=1) if r["steps"] == 4][:3]
    gold = [[float(x.split("= ")[1]) for x in r["response"].splitlines()[:-1]] for r in recs]

    def orbit_text(values):
        return "\n".join(f"x{i + 1} = {v:.4f}" for i, v in enumerate(values)) + f"\nThe answer is {values[-1]:.4f}."

    exact = ev.score_logistic(recs, [r["response"] for r in recs])
    assert exact["mean_abs_error"] == 0 and exact["collapse_rate"] == 0 and exact["accuracy"] == 1

    g = gold[0]
    off = [g[0], g[1] + 0.1, g[2], g[3] - 0.2]  # wrong at x2 and x4, no repeats
    stuck = [g[0], g[1], g[1], g[1]]  # x3 repeats x2 while the orbit moves on
    short = g[:2]  # stops after x2
    got = ev.score_logistic([recs[0]] * 3, [orbit_text(off), orbit_text(stuck), orbit_text(short)])
    assert got["collapsed"] == 1 and got["collapse_rate"] == pytest.approx(1 / 3) and got["mean_collapse_step"] == 3
    assert got["missing_per_step"][:4] == [0, 0, 1, 1]
    # per-step error: mean over the predictions that have the step
    assert got["abs_error_per_step"][0] == pytest.approx(0)
    assert got["abs_error_per_step"][1] == pytest.approx(0.1 / 3, abs=1e-9)
    assert got["abs_error_per_step"][2] == pytest.approx(abs(g[1] - g[2]) / 2, abs=1e-9)
    assert got["abs_error_per_step"][3] == pytest.approx((0.2 + abs(g[1] - g[3])) / 2, abs=1e-9)
    assert got["accuracy"] == 0  # none ends on the true final value
    assert ev.is_logistic(recs[0]) and not ev.is_logistic({"id": "arith-0-1"})


# ---------------------------------------------------------------------------------------------------------------
# Run dirs
# ---------------------------------------------------------------------------------------------------------------
def test_load_run_rebuilds_the_trained_splits(runs, loaded):
    _, _, cfg, splits = loaded
    saved = read_json(runs["nora"] / "splits.json")["ids"]
    assert {k: [r["id"] for r in v] for k, v in splits.items()} == saved
    assert cfg.adapter.method == "nora"


def test_evaluate_run_writes_eval_json(runs, loaded):
    run = runs["nora"]
    result = ev.evaluate_run(run, split="test", max_examples=4, batch_size=4, max_new_tokens=8)
    assert read_json(run / "eval_test.json") == json.loads(json.dumps(result, default=str))
    model, tokenizer, cfg, splits = loaded
    direct = ev.perplexity(model, tokenizer, splits["test"][:4], max_length=cfg.max_length)
    assert result["ppl"] == pytest.approx(direct["ppl"], rel=1e-6) and result["tokens"] == direct["tokens"]
    assert result["ppl_full"] < result["ppl"] * 10 and result["n"] == 4
    kinds = {r["id"].split("-")[0] for r in splits["test"][:4]}
    assert ("accuracy" in result) == bool(kinds & {"arith", "logistic"})
    assert ("logistic" in result) == ("logistic" in kinds)
    assert result["label"] == "nora-r4" and result["split"] == "test"
    no_gen = ev.evaluate_run(run, split="validation", generate=False, max_examples=3)
    assert "accuracy" not in no_gen and (run / "eval_validation.json").exists()


def test_max_generate_limits_generation_not_perplexity(runs, loaded, monkeypatch):
    run = runs["nora"]
    prompts_seen = []

    def fake_generate(model, tokenizer, records, **kw):
        prompts_seen.extend(records)
        return ["The answer is 1."] * len(records)

    monkeypatch.setattr("nora_peft.lab.eval.run.generate", fake_generate)
    result = ev.evaluate_run(run, split="test", max_generate=2, batch_size=4)
    model, tokenizer, cfg, splits = loaded
    n = len(splits["test"])
    assert n > 2
    direct = ev.perplexity(model, tokenizer, splits["test"], max_length=cfg.max_length)
    assert result["n"] == n and result["tokens"] == direct["tokens"]  # perplexity over every record
    assert result["n_generated"] == 2 and 0 < len(prompts_seen) <= 2  # generation over the first 2 only


def test_changed_data_is_detected(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["lora"], run)
    splits = read_json(run / "splits.json")
    splits["ids"]["test"] = splits["ids"]["test"][::-1]
    write_json_atomic(run / "splits.json", splits)
    with pytest.raises(ValueError, match="differs from the one in splits.json"):
        ev.load_run(run)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def test_cli_eval_writes_json_and_prints_a_summary(runs, tiny, tmp_path, capsys, monkeypatch):
    from nora_peft.cli import main

    assert main(["eval", "--run", str(runs["lora"]), "--max-examples", "3", "--no-generate"]) == 0
    printed = capsys.readouterr().out
    saved = read_json(runs["lora"] / "eval_test.json")
    assert saved["n"] == 3 and f"response {significant(saved['ppl'])}" in printed and "lora-r4" in printed
    assert str(runs["lora"] / "eval_test.json") in printed and not printed.lstrip().startswith("{")

    adapter = runs["nora"] / "adapter"
    argv = ["eval", "--model", tiny, "--adapter", str(adapter), "--data", "arith", "--max-examples", "3"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    adapted = read_json(adapter / "eval_arith_test.json")
    assert adapted["accuracy"] is not None and len(adapted["accuracy_ci95"]) == 2
    assert "95% CI" in printed and "gold" in printed and "predicted" in printed

    out = tmp_path / "base.json"
    base_argv = ["eval", "--model", tiny, "--data", "arith", "--max-examples", "3", "--no-generate"]
    assert main([*base_argv, "--out", str(out)]) == 0
    base = read_json(out)
    assert base["adapter"] is None and str(out) in capsys.readouterr().out
    assert base["ppl"] != adapted["ppl"]  # the adapter changed the model
    monkeypatch.chdir(tmp_path)  # no --out: runs/eval/<model>_eval_<data>_<split>.json under the working dir
    assert main(base_argv) == 0
    default = tmp_path / "runs" / "eval" / f"{slug(tiny)}_eval_arith_test.json"
    assert read_json(default)["ppl"] == base["ppl"] and str(default.relative_to(tmp_path)) in capsys.readouterr().out


def test_format_summary_names_perplexity_accuracy_ci_and_examples():
    result = {
        "n": 200, "ppl": 3.21, "tokens": 31000, "ppl_full": 5.5, "model": "smollm2-135m", "adapter": None,
        "data": "gsm8k", "split": "test", "precision": "bf16", "seconds": {"perplexity": 12.3, "generation": 400},
        "generation_stats": {"new_tokens": 30000, "stopped_at_answer": 150, "stopped_at_eos": 40,
                             "hit_max_new_tokens": 10},
        "generation": {"accuracy": 0.025, "ci95": (0.0107, 0.0573), "n": 200, "correct": 5, "answered": 180,
                       "examples": [{"id": "q", "question": "How many\n eggs?", "prediction": "18", "gold": "18"}]},
    }  # fmt: skip
    text = ev.format_summary(result, Path("out.json"))
    for part in ("smollm2-135m (no adapter) on gsm8k test (200 records)",
                 "response 3.21, full 5.50; 31,000 response tokens", "2.50% (5/200), 95% CI [1.07%, 5.73%]",
                 "180/200", "How many eggs?", "predicted 18, gold 18 (right)",
                 "'####' 150, EOS 40, the cap 10", "JSON: out.json"):  # fmt: skip
        assert part in text, part
    assert len(text.splitlines()) <= 10


@pytest.mark.parametrize("method", ["nora", "lora"])
def test_cli_eval_adapter_that_does_not_fit(runs, tmp_path, capsys, method):
    from nora_peft.cli import main

    wider = make_tiny_model_dir(tmp_path / "wider", hidden=48)
    code = main(["eval", "--model", wider, "--adapter", str(runs[method] / "adapter"), "--data", "arith",
                 "--max-examples", "2", "--no-generate"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit base model" in err and "Load it onto the base model it was trained on" in err
    assert "48" in err and "32" in err  # both shapes named
    assert "Traceback" not in err


def test_bf16_decoding_runs_on_a_bf16_copy_and_matches_generate_on_that_copy(loaded):
    """``precision="bf16"`` on a CPU decodes with bf16 parameters (fp32 buffers), without autocast: the same greedy
    tokens as ``model.generate`` on a model cast that way by hand; the caller's model keeps its fp32 weights."""
    import copy

    model, tokenizer, _, splits = loaded
    records = splits["test"][:4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = ev.generate(model, tokenizer, records, max_new_tokens=10, batch_size=4, stop_at_answer=False,
                       precision="bf16")  # fmt: skip
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.data = p.data.bfloat16()
    assert any(b.dtype == torch.float32 for b in reference.buffers()) or not list(reference.buffers())
    for rec, text in zip(records, ours):
        ids = torch.tensor([ev.prompt_ids(tokenizer, [rec])[0]])
        with torch.no_grad():
            out = reference.generate(input_ids=ids, max_new_tokens=10, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert text == tokenizer.decode(new, skip_special_tokens=True)


def test_decode_weights_leaves_other_precisions_alone(loaded):
    model = loaded[0]
    assert ev.decode_weights(model, "fp32") == (model, "fp32") and ev.decode_weights(model, None) == (model, None)
    copy, precision = ev.decode_weights(model, "bf16")
    assert copy is not model and precision is None
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
