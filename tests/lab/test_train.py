"""``nora train``: every method trains through one code path, run dir layout, exact resume, NaN guard, config
files and flags, bad input caught before training work, real GSM8K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from nora_peft.io import read_json, read_jsonl
from nora_peft.lab.train import FLAGS, NonFiniteLossError, TrainConfig, config_from_args, train


# ---------------------------------------------------------------------------------------------------------------
# A tiny base model (no downloads): the project's BPE tokenizer recipe on a small corpus + a 2-layer Llama
# ---------------------------------------------------------------------------------------------------------------
def make_tiny_model_dir(path: Path, *, hidden: int = 32, seed: int = 0) -> str:
    """Save a tiny Llama (``hidden`` wide, 2 layers) and a 300-token BPE tokenizer into ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nora_peft.bases.embedded import build_tokenizer, pretraining_corpus

    tokenizer = build_tokenizer(pretraining_corpus(300), vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # big enough logits that a frozen random head can express a confident prediction
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def small_config(model: str, out: Path, **overrides) -> TrainConfig:
    """A few-step run on a small synthetic set; everything the tests don't care about kept cheap."""
    d = dict(
        model=model,
        data="arith",
        data_options={"n": 80},
        output_dir=str(out),
        max_steps=4,
        batch_size=4,
        max_length=256,
        lr=1e-2,
        save_steps=2,
        logging_steps=1,
        progress=False,
        precision="fp32",  # exact comparisons (resume, DDP); bf16 autocast is tested on its own
        adapter={"method": "nora", "r": 4},
    )
    d.update(overrides)
    return TrainConfig.from_dict(d)


class Snapshot(TrainerCallback):
    """Keeps every parameter at the start and at the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Every method, one code path
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nora", "lora", "rslora", "dora"])
def test_every_method_trains_and_only_adapter_params_change(tiny_model, tmp_path, method):
    snap = Snapshot()
    run = train(small_config(tiny_model, tmp_path / method, adapter={"method": method, "r": 4}), callbacks=[snap])
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    assert snap.trainable and changed == snap.trainable  # every adapter tensor moved, nothing else did
    prefix = "nora_" if method == "nora" else "lora_"
    assert all(prefix in n for n in snap.trainable)
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved and all(prefix in k for k in saved)  # the adapter file holds adapter weights only
    assert read_json(run / "adapter" / "adapter_config.json")["peft_type"] == ("NORA" if method == "nora" else "LORA")
    summary = read_json(run / "train_summary.json")
    assert summary["method"] == method and summary["steps"] == 4
    assert summary["trainable_params"] == sum(snap.before[n].numel() for n in snap.trainable)


def test_loss_falls_on_a_learnable_task(tiny_model, tmp_path):
    # a response the adapter can learn in a few steps (a fixed sentence); loaded from a local file via field_map
    rows = [{"q": f"Say the colour of item {i}.", "a": "The colour is blue."} for i in range(100)]
    data = _jsonl(tmp_path / "toy.jsonl", rows)
    fields = {"prompt": "q", "response": "a"}
    cfg = small_config(tiny_model, tmp_path / "run", data=data, data_options={}, field_map=fields,
                       max_steps=30, logging_steps=5, save_steps=30, lr=2e-2)  # fmt: skip
    run = train(cfg)
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b <= a + 0.05 for a, b in zip(losses, losses[1:])), losses  # falls step after step


def test_run_dir_has_every_file(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run", eval_steps=2)
    run = train(cfg)
    assert run == tmp_path / "run"
    for name in ("config.json", "splits.json", "metrics.jsonl", "train_summary.json"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert TrainConfig.from_dict(read_json(run / "config.json")) == cfg  # resolved config round-trips

    splits = read_json(run / "splits.json")
    assert splits["counts"] == {"train": 64, "validation": 8, "test": 8}
    assert len(set(sum(splits["ids"].values(), []))) == 80  # disjoint
    assert splits["train_stats"]["examples"] == 64
    assert splits["train_stats"]["kept"] + splits["train_stats"]["dropped"] == 64

    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all("tokens_per_s" in r and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]

    summary = read_json(run / "train_summary.json")
    for key in ("final_loss", "steps", "tokens_seen", "wall_time_s", "tokens_per_s", "trainable_params",
                "total_params", "label"):  # fmt: skip
        assert summary[key] is not None, key
    assert summary["final_loss"] == train_rows[-1]["loss"]
    assert summary["tokens_seen"] == train_rows[-1]["num_input_tokens_seen"]
    assert summary["label"] == "nora-r4"
    assert summary["final_eval_loss"] == [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


def test_same_seed_same_numbers(tiny_model, tmp_path):
    a = train(small_config(tiny_model, tmp_path / "a"))
    b = train(small_config(tiny_model, tmp_path / "b"))
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(small_config(tiny_model, tmp_path / "c", seed=1))
    wc = load_file(c / "adapter" / "adapter_model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


# ---------------------------------------------------------------------------------------------------------------
# Resume and finished runs
# ---------------------------------------------------------------------------------------------------------------
class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("method", ["nora", "dora"])
def test_resume_continues_exactly(tiny_model, tmp_path, method):
    # dropout > 0 and a mid-epoch stop: data order, optimizer, scheduler and RNG must all be restored
    kw = dict(max_steps=8, save_steps=3, adapter={"method": method, "r": 4, "dropout": 0.3})
    straight = train(small_config(tiny_model, tmp_path / "straight", **kw))
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model, tmp_path / "resumed", **kw), callbacks=[CrashAfterSave(6)])
    assert not (tmp_path / "resumed" / "train_summary.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):  # an unfinished run is not silently restarted
        train(small_config(tiny_model, tmp_path / "resumed", **kw))
    resumed = train(small_config(tiny_model, tmp_path / "resumed", resume=True, **kw))

    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-7)
    la = [(r["step"], r["loss"]) for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in lb] == list(range(1, 9))  # no step logged twice after the restart
    assert [s for s, _ in la] == [s for s, _ in lb]
    assert [x for _, x in la] == pytest.approx([x for _, x in lb], rel=1e-6)
    assert read_json(resumed / "train_summary.json")["resumed_from"] == "checkpoint-6"


def test_finished_run_is_not_retrained(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run", max_steps=2)
    run = train(cfg)
    stamp = (run / "train_summary.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="already finished"):
        train(cfg)
    assert train(small_config(tiny_model, tmp_path / "run", max_steps=2, resume=True)) == run
    assert (run / "train_summary.json").stat().st_mtime_ns == stamp  # returned as is
    with pytest.raises(FileExistsError, match=r"finished with another config.*max_steps: 2 -> 3"):
        train(small_config(tiny_model, tmp_path / "run", max_steps=3, resume=True))
    train(small_config(tiny_model, tmp_path / "run", max_steps=2, overwrite=True))
    assert (run / "train_summary.json").stat().st_mtime_ns != stamp


def test_output_dir_with_another_run_is_refused(tiny_model, tmp_path):
    train(small_config(tiny_model, tmp_path / "run", max_steps=2))
    with pytest.raises(FileExistsError, match=r"holds another run.*lr: 0.01 -> 0.001"):
        train(small_config(tiny_model, tmp_path / "run", max_steps=2, lr=1e-3))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a nora run dir"):
        train(small_config(tiny_model, tmp_path / "other", max_steps=2, overwrite=True))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# NaN guard
# ---------------------------------------------------------------------------------------------------------------
class Poison(TrainerCallback):
    """Fill one adapter weight with NaN after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


@pytest.mark.parametrize("poison_step, message", [(3, r"Loss is nan at step 4"), (4, r"became NaN/inf at step 4")])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, poison_step, message):
    cfg = small_config(tiny_model, tmp_path / "run", max_steps=8, save_steps=2)
    with pytest.raises(NonFiniteLossError, match=message) as info:
        train(cfg, callbacks=[Poison(poison_step)])
    assert "lower --lr" in str(info.value)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    good = load_file(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (run / "train_summary.json").exists() and not (run / "adapter").exists()
    # the last good checkpoint resumes (without the poison the run now finishes)
    train(small_config(tiny_model, run, max_steps=8, save_steps=2, resume=True))
    assert read_json(run / "train_summary.json")["resumed_from"] == "checkpoint-2"


# ---------------------------------------------------------------------------------------------------------------
# Config files and flags
# ---------------------------------------------------------------------------------------------------------------
def _parse(argv: list[str]):
    from nora_peft.cli import build_parser

    return build_parser("train").parse_args(["train", *argv])


def test_config_file_and_flag_override(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data": "logistic", "lr": 5e-4, "max_steps": 7, "adapter": {"method": "lora", "r": 16}, "seed": 3}
        )
    )
    cfg = config_from_args(
        _parse(["--config", str(path), "--lr", "1e-3", "--r", "4", "--target-modules", "q_proj,v_proj"])
    )
    assert (cfg.data, cfg.lr, cfg.max_steps, cfg.seed) == ("logistic", 1e-3, 7, 3)  # file, flag, file, file
    assert (cfg.adapter.method, cfg.adapter.r, cfg.adapter.target_modules) == ("lora", 4, ["q_proj", "v_proj"])
    json_path = tmp_path / "cfg.json"
    json_path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(json_path) == cfg
    flags = _parse(["--method", "nora", "--activation", "relu", "--scaling", "rslora", "--data-options", "n=50",
                    "--field-map", '{"prompt": "q"}', "--max-train-examples", "none", "--no-progress",
                    "--gradient-checkpointing", "--precision", "fp32"])  # fmt: skip
    cfg = config_from_args(flags)
    assert cfg.adapter.activation == "relu" and cfg.adapter.scaling == "rslora"
    assert cfg.data_options == {"n": 50} and cfg.field_map == {"prompt": "q"}
    assert cfg.max_train_examples is None and cfg.progress is False and cfg.gradient_checkpointing is True
    assert config_from_args(_parse([])) == TrainConfig()  # no flags: the defaults


def test_every_field_has_a_flag():
    fields = set(TrainConfig.__dataclass_fields__) - {"adapter"}
    flagged = {name for name, _ in FLAGS.values() if not name.startswith("adapter.")}
    assert fields == flagged
    adapter_fields = {"method", "r", "alpha", "dropout", "activation", "granularity", "scaling", "target_modules"}
    assert {name.split(".", 1)[1] for name, _ in FLAGS.values() if name.startswith("adapter.")} == adapter_fields


def test_bad_config_values():
    with pytest.raises(ValueError, match="Unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="Unknown adapter method"):
        TrainConfig(adapter={"method": "qlora"})
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="resume and overwrite"):
        TrainConfig(resume=True, overwrite=True)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before training work
# ---------------------------------------------------------------------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_inputs_fail_early(tiny_model, tmp_path):
    rows = [{"question": f"What is {i} plus 1?", "solution": f"It is {i + 1}."} for i in range(30)]
    data = _jsonl(tmp_path / "qa.jsonl", rows)
    cases = [
        (dict(data=data, field_map={"prompt": "quest", "response": "solution"}), r"'quest'.*fields that exist"),
        (dict(data=_jsonl(tmp_path / "none.jsonl", [{"question": "q?", "solution": None}] * 5)), r"no records|empty"),
        (dict(data=data, field_map={"prompt": "question", "response": "solution"}, max_length=8), "Raise --max-length"),
        (dict(adapter={"method": "lora", "target_modules": ["c_attn"]}), r"c_attn|target"),
        (dict(adapter={"method": "nora", "target_modules": ["c_attn"]}), r"Linear layers in this model"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            train(small_config(tiny_model, out, **overrides))
        assert info.match(message), (overrides, str(info.value))
        assert not (out / "checkpoints").exists()  # nothing trained


def test_cli_train_prints_summary_and_clear_errors(tiny_model, tmp_path, capsys):
    from nora_peft.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", tiny_model, "--data", "arith", "--data-options", "n=40", "--max-steps", "2",
            "--batch-size", "2", "--output-dir", str(out), "--no-progress", "--method", "rslora",
            "--r", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label"] == "rslora-r2" and printed["steps"] == 2
    assert main([*argv[:-1], "4"]) == 2  # same dir, other rank
    assert "holds another run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------
def test_gsm8k_trains_a_few_steps(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NORA_DATA_DIR", str(gsm8k_dir.parent))
    cfg = small_config(tiny_model, tmp_path / "gsm8k", data="gsm8k", data_options={}, max_train_examples=6,
                       max_steps=3, batch_size=2, max_length=512)  # fmt: skip
    run = train(cfg)
    splits = read_json(run / "splits.json")
    assert splits["counts"]["train"] == 6 and splits["counts"]["test"] == 1319  # GSM8K's own test split kept
    assert all(i.startswith("gsm8k-train-") for i in splits["ids"]["train"])
    assert read_json(run / "train_summary.json")["steps"] == 3
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)


def test_auto_precision_is_bf16_autocast_exactly_where_the_cpu_has_bf16_units(monkeypatch):
    from nora_peft.lab.train import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto") == "bf16"
    assert precision.base_dtype("bf16") == torch.float32  # the CPU base stays fp32 under autocast
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_precision("auto") == "fp32"


def test_bf16_autocast_loss_curve_follows_fp32(tiny_model, tmp_path):
    """bf16 autocast on CPU is numerically sane: the same run's per-step losses stay within 2% of fp32's."""
    curves = {}
    for prec in ("fp32", "bf16"):
        run = train(small_config(tiny_model, tmp_path / prec, precision=prec, max_steps=6))
        assert read_json(run / "train_summary.json")["precision"] == prec
        curves[prec] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(curves["fp32"]) == len(curves["bf16"]) == 6
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert abs(a - b) <= 0.02 * abs(a), curves
    assert curves["bf16"] != curves["fp32"]  # autocast really ran in bf16


def test_help_shows_the_dataclass_defaults():
    """The defaults in `nora train --help` come from TrainConfig itself (no second copy to drift)."""
    import argparse

    from nora_peft.lab.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    cfg = TrainConfig()
    assert helps["--lr"].endswith(f"(default: {cfg.lr})") and helps["--r"].endswith(f"(default: {cfg.adapter.r})")
    assert helps["--batch-size"].endswith(f"(default: {cfg.batch_size})")
