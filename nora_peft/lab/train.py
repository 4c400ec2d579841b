"""``TrainConfig`` -> a ``transformers.Trainer`` run -> a run dir; ``nora train``.

One code path for every method: the adapter is built from ``methods.AdapterSpec`` (NoRA, LoRA, rsLoRA, DoRA), and
everything else -- data, splits, schedule, precision, seed -- is the same flags for all of them. The loss is on
response tokens only (``data.build_lm_dataset`` masks the prompt with -100).

Run dir (see DESIGN.md)::

    config.json          the resolved TrainConfig (every field, defaults filled in)
    splits.json          data description: ids per split, tokenisation stats (kept / truncated / dropped)
    metrics.jsonl        every Trainer log line (loss, lr, grad norm, tokens/s, eval loss), appended
    checkpoints/checkpoint-N/   Trainer checkpoints (adapter, optimizer, scheduler, RNG) every save_steps
    adapter/             peft save_pretrained of the final adapter (+ the tokenizer, via Trainer.save_model)
    train_summary.json   written last, atomically: its presence means the run finished

Because it is ``transformers.Trainer``, ``torchrun --nproc_per_node N -m nora_peft.cli train ...`` and
``accelerate launch -m nora_peft.cli train ...`` run this same code under DDP (or FSDP with an accelerate config);
only the main process writes the run dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import METHODS, AdapterSpec
from .io import append_jsonl, read_json, read_jsonl, write_json_atomic

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: fields that say *how* to run, not *what* to train: a run dir's identity ignores them
RUN_CONTROL_FIELDS = ("output_dir", "resume", "overwrite", "progress")
#: files and folders a run dir may hold (the only things ``overwrite`` deletes)
RUN_FILES = ("config.json", "splits.json", "metrics.jsonl", "train_summary.json", "analysis.json")
RUN_DIRS = ("checkpoints", "adapter", "figures")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or non-finite adapter weights); the run stopped before saving them."""


@dataclass
class TrainConfig:
    """Everything that defines one fine-tuning run. Every field is also a ``nora train`` flag.

    The defaults make ``nora train`` with no arguments a quick demo (about a minute on two CPU cores with
    ``--threads 1``): the embedded default base model, the synthetic ``reasoning`` mix (2,000 records -> 1,600 for
    training), NoRA r=8 on q/v, one epoch = 200 steps of batch 8. ``lr=2e-4`` is the usual LoRA fine-tuning rate;
    raise it (1e-3) for the tiny embedded base, lower it (5e-5) if the loss turns NaN on a large model.
    """

    model: str | None = None  # None -> the embedded default base (nora_peft.lab.base)
    data: str = "reasoning"  # a load_source name (arith, logistic, reasoning, gsm8k, ...) or a local file / hub id
    data_options: dict = field(default_factory=dict)  # extra keyword options for data.load_source
    field_map: dict | None = None  # {"prompt": "question", "response": "answer", ...} for local files / hub ids
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    output_dir: str = ""  # "" -> runs/<data>-<adapter label>-s<seed>
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # >0 overrides epochs; -1: train for `epochs`
    batch_size: int = 8  # per device
    grad_accum: int = 1
    max_length: int = 256  # tokens of prompt + response; longer responses are truncated, too-long prompts dropped
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0  # adapter init, dropout
    data_seed: int = 0  # splits and data order
    val_size: float = 0.1
    test_size: float = 0.1
    max_train_examples: int | None = None  # cap the train split (after splitting: val/test stay the same)
    save_steps: int = 50
    save_total_limit: int | None = 2  # keep only the newest checkpoints (None: keep all)
    logging_steps: int = 10
    eval_steps: int | None = None  # validation loss every N steps (None: no evaluation during training)
    resume: bool = False
    overwrite: bool = False
    precision: str = "auto"  # auto = bf16 where the hardware supports it (GPU, or a CPU with bf16 units), else fp32
    group_by_length: bool = False  # batches of similar length (less padding); the padding fraction is reported
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterSpec(**self.adapter)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {PRECISIONS}.")
        checks = [
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1"),
            (self.max_length >= 2, f"max_length={self.max_length} must be >= 2"),
            (self.max_steps > 0 or self.epochs > 0, "set max_steps > 0 or epochs > 0"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)"),
            (self.save_steps >= 1, f"save_steps={self.save_steps} must be >= 1"),
            (self.logging_steps >= 1, f"logging_steps={self.logging_steps} must be >= 1"),
            (self.eval_steps is None or self.eval_steps >= 1, f"eval_steps={self.eval_steps} must be >= 1 or None"),
            (not (self.resume and self.overwrite), "choose one of resume and overwrite, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (e.g. a parsed YAML file); unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}; valid fields: {sorted(names)}.")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON config file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"Config file {path} must hold a mapping of TrainConfig fields, got {type(d).__name__}.")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        data = Path(self.data).stem if os.sep in self.data else self.data.replace("/", "_")
        return Path("runs") / f"{data}-{self.adapter.label()}-s{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The fields that define *what* is trained (two runs with equal identity are the same run)."""
        d = self.to_dict()
        for key in RUN_CONTROL_FIELDS:
            d.pop(key, None)
        return d


# ---------------------------------------------------------------------------------------------------------------
# Run dir bookkeeping
# ---------------------------------------------------------------------------------------------------------------
def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest *complete* checkpoint (``trainer_state.json`` is written last), or None."""
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    done = [p for p in ckpt_root.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if json.dumps(old.get(k)) != json.dumps(new.get(k))]


def check_run_dir(cfg: TrainConfig, run_dir: Path) -> str:
    """Decide what to do with ``run_dir`` before any work: ``"fresh"``, ``"resume"``, ``"done"`` (return it as is)
    or ``"overwrite"``; raise ``FileExistsError`` naming the fix when it holds something else.

    ``resume`` may continue an *unfinished* run with changed settings (they are printed); a *finished* run is only
    returned when its config equals the one asked for."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "fresh"
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileExistsError(
            f"Output dir {run_dir} is not empty and is not a nora run dir (no config.json); choose another "
            "--output-dir (nothing there was touched)."
        )
    if cfg.overwrite:
        return "overwrite"
    old = TrainConfig.from_dict(read_json(config_path)).identity()
    changes = _diff(old, cfg.identity())
    finished = (run_dir / "train_summary.json").exists()
    if changes and not cfg.resume:
        raise FileExistsError(
            f"Output dir {run_dir} holds another run (config differs: {'; '.join(changes)}). Choose another "
            "--output-dir, or pass --overwrite to delete it and retrain, or --resume to continue it with the new "
            "settings."
        )
    if finished:
        if cfg.resume and changes:
            raise FileExistsError(
                f"Run {run_dir} already finished with another config ({'; '.join(changes)}); --resume would return "
                "a run that is not the one asked for. Choose another --output-dir, or pass --overwrite to retrain."
            )
        if cfg.resume:
            return "done"
        raise FileExistsError(
            f"Run {run_dir} already finished (train_summary.json exists). Pass --resume to reuse it as is, or "
            "--overwrite to delete it and retrain."
        )
    if last_checkpoint(run_dir) is not None and not cfg.resume:
        raise FileExistsError(
            f"Run {run_dir} has checkpoints of an unfinished run ({last_checkpoint(run_dir).name}). Pass --resume to "
            "continue it from there, or --overwrite to start over."
        )
    if changes:
        print(f"Resuming {run_dir} with changed settings: {'; '.join(changes)}", file=sys.stderr)
    return "resume" if cfg.resume else "fresh"


def _clear_run_dir(run_dir: Path) -> None:
    """Delete a previous run's files (only the names a run dir holds; anything else is left alone)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for path in run_dir.glob("eval_*.json"):
        path.unlink()
    for name in RUN_DIRS:
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we restart from (they will be logged again)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def load_splits(cfg: TrainConfig) -> dict[str, list[dict[str, Any]]]:
    """The run's records per split: ``load_source`` -> ``make_splits`` -> cap the train split. Deterministic in
    ``data_seed``; evaluation rebuilds the same splits from ``config.json``."""
    from .data import load_source, make_splits

    native = load_source(cfg.data, field_map=cfg.field_map, seed=cfg.data_seed, **cfg.data_options)
    splits = make_splits(native, seed=cfg.data_seed, val_size=cfg.val_size, test_size=cfg.test_size)
    if cfg.max_train_examples is not None:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    if not splits["train"]:
        raise ValueError(
            f"Data {cfg.data!r} gave an empty train split (native splits: "
            f"{ {k: len(v) for k, v in native.items()} }, max_train_examples={cfg.max_train_examples}). Check the "
            "data path / field_map / filters, or lower val_size/test_size."
        )
    return splits


def tokenize_split(records: list[dict[str, Any]], tokenizer, cfg: TrainConfig):
    """``build_lm_dataset`` with response-only labels (it raises, naming the fix, when no prompt fits
    ``max_length``); the ``id`` column is dropped for the Trainer."""
    from .data import build_lm_dataset

    dataset, stats = build_lm_dataset(records, tokenizer, max_length=cfg.max_length, response_only=True)
    return dataset.remove_columns(["id"]), stats


class PaddingCounter:
    """A collator that right-pads (``collate``) and counts real and padded token slots, for the padding fraction."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.real = 0
        self.slots = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features, self.pad_token_id)
        self.real += int(batch["attention_mask"].sum())
        self.slots += batch["attention_mask"].numel()
        return batch

    @property
    def padding_fraction(self) -> float | None:
        return round(1 - self.real / self.slots, 4) if self.slots else None


def collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch: ``input_ids`` with the pad token, ``attention_mask`` with 0, ``labels`` with -100."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        out["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        out["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
        out["labels"].append(list(f["labels"]) + [-100] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast is faster than fp32;
    elsewhere torch emulates bf16 and it is slower."""
    import torch

    try:
        native = _cpu_flags() & {"avx512_bf16", "amx_bf16"}
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(native)
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU or CPU that supports it natively, else ``fp32``; explicit choices are checked."""
    import torch

    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision='fp16' needs a CUDA GPU (loss scaling); use 'fp32' or 'bf16' on CPU.")
    return precision


def base_dtype(precision: str):
    """The dtype the frozen base is loaded in. On a GPU, the precision's own dtype; on a CPU the base stays fp32 and
    bf16 runs as autocast (measured faster on CPUs with bf16 units, and the weights keep full precision)."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ---------------------------------------------------------------------------------------------------------------
# Trainer pieces
# ---------------------------------------------------------------------------------------------------------------
def _trainer_classes():
    """Build the Trainer subclass and callbacks lazily (``nora --help`` must not import transformers)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import Trainer, TrainerCallback

    class NoraTrainer(Trainer):
        """``Trainer`` + a NaN/inf guard and a windowed tokens/s in every log line."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                step = self.state.global_step + 1
                ckpt = last_checkpoint(Path(self.args.output_dir).parent)
                raise NonFiniteLossError(
                    f"Loss is {loss.item()} at step {step} (lr={self._get_learning_rate():.3g}). The run stopped "
                    f"before the optimizer step; last good checkpoint: {ckpt or 'none yet'}. Try a lower --lr, "
                    "--precision fp32, a smaller --max-grad-norm, or check the data for empty responses."
                )
            return loss

        def _save_checkpoint(self, model, trial):
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteLossError(
                    f"Adapter weights became NaN/inf at step {self.state.global_step} ({bad[0]} and "
                    f"{len(bad) - 1} more); the checkpoint was not saved. Try a lower --lr or --precision fp32."
                )
            super()._save_checkpoint(model, trial)

        def log(self, logs, start_time=None):
            now, seen = time.perf_counter(), self.state.num_input_tokens_seen
            last_t, last_seen = getattr(self, "_nora_last", (None, None))
            if "loss" in logs:
                if last_t is None and start_time is not None:  # first log line: since training started
                    last_t = now - (time.time() - start_time)
                    last_seen = self._initial_num_input_tokens_seen
                if last_t is not None and now > last_t:
                    logs["tokens_per_s"] = round((seen - last_seen) / (now - last_t), 1)
                self._nora_last = (now, seen)
            super().log(logs, start_time)

    class MetricsFile(TrainerCallback):
        """Append every log line (with its step) to ``metrics.jsonl`` (main process only); always log the last
        step, so the final loss is on record whatever ``logging_steps`` is."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                append_jsonl(self.path, {**logs, "step": state.global_step, "time": time.time()})

    class Progress(TrainerCallback):
        """A tqdm bar over optimizer steps showing the latest loss and tokens/s (main process only)."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is None or not logs:
                return
            if "loss" in logs:
                post = {"loss": f"{logs['loss']:.4f}", "tok/s": f"{logs.get('tokens_per_s', float('nan')):.0f}"}
                self.bar.set_postfix(post)
                self.bar.write(
                    f"step {state.global_step:>5d}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
                    f"  grad_norm {logs.get('grad_norm', float('nan')):.3f}  tok/s {post['tok/s']}"
                )
            if "eval_loss" in logs:
                self.bar.write(f"step {state.global_step:>5d}  eval_loss {logs['eval_loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return NoraTrainer, MetricsFile, Progress


def training_arguments(cfg: TrainConfig, run_dir: Path, precision: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,  # transformers < 5.23 (pinned: peft 0.21 agrees with it)
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        seed=cfg.seed,
        data_seed=cfg.data_seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # our guard raises instead of hiding NaN losses
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        bf16=precision == "bf16",  # on CPU: autocast over the fp32 base
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        fp16=precision == "fp16",
        use_cpu=not _cuda(),
        report_to="none",
        disable_tqdm=True,  # our Progress callback draws the bar
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, callbacks: list | None = None) -> Path:
    """Fine-tune ``cfg.model`` with ``cfg.adapter`` on ``cfg.data``; return the run dir.

    A finished run (``train_summary.json`` exists) is never retrained: it raises, unless ``overwrite`` (delete and
    retrain) or ``resume`` (return it as is). ``resume`` continues an unfinished run from its newest complete
    checkpoint with the same data order, optimizer, scheduler and RNG state (and starts fresh when there is none).
    ``callbacks`` are extra ``TrainerCallback`` objects (tests use them to interrupt a run).
    """
    import torch
    from accelerate import PartialState
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from ..methods import build_peft_model, count_parameters
    from .base import load_model_and_tokenizer
    from .data import describe_splits

    run_dir = cfg.resolved_output_dir()
    action = check_run_dir(cfg, run_dir)
    if action == "done":
        print(f"Run {run_dir} already finished; returning it (--resume).", file=sys.stderr)
        return run_dir
    precision = resolve_precision(cfg.precision)
    args = training_arguments(cfg, run_dir, precision)  # also sets up torch.distributed under torchrun
    state = PartialState()
    main = state.is_main_process

    # --- everything that can fail on bad input, before any training work -----------------------------------------
    set_seed(cfg.seed)
    splits = load_splits(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=base_dtype(precision))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, train_stats = tokenize_split(splits["train"], tokenizer, cfg)
    eval_ds = None
    if cfg.eval_steps:
        if not splits["validation"]:
            raise ValueError("eval_steps is set but the validation split is empty; raise --val-size or unset it.")
        eval_ds, _ = tokenize_split(splits["validation"], tokenizer, cfg)
    set_seed(cfg.seed)  # adapter init does not depend on how much randomness data loading used
    model = build_peft_model(model, cfg.adapter)
    for p in model.parameters():  # adapters train in fp32 even on a bf16/fp16 base (autocast does the rest)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    params = count_parameters(model)

    # --- the run dir: only the main process writes ------------------------------------------------------------------
    resume_from = last_checkpoint(run_dir) if action == "resume" else None
    state.wait_for_everyone()
    if main:
        if action == "overwrite":
            _clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        description = describe_splits(splits, source=cfg.data, seed=cfg.data_seed)
        write_json_atomic(run_dir / "splits.json", {**description, "train_stats": train_stats})
        if resume_from is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            _trim_metrics(run_dir / "metrics.jsonl", int(resume_from.name.split("-")[-1]))
            print(f"Resuming {run_dir} from {resume_from.name}", file=sys.stderr)
    state.wait_for_everyone()

    NoraTrainer, MetricsFile, Progress = _trainer_classes()
    padding = PaddingCounter(tokenizer.pad_token_id)
    trainer = NoraTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=padding,
        processing_class=tokenizer,
        callbacks=[MetricsFile(run_dir / "metrics.jsonl"), *(callbacks or [])],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if cfg.progress:
        trainer.add_callback(Progress())
    parallel = "fsdp" if trainer.is_fsdp_enabled else "ddp" if state.num_processes > 1 else "none"
    if main:
        print(
            f"nora train: {cfg.adapter.label()} on {cfg.model or 'embedded base'} | data {cfg.data} "
            f"({len(train_ds)} train examples, {train_stats}) | trainable {params['trainable']:,} of "
            f"{params['total']:,} params | {precision} | {args.device} x{state.num_processes} ({parallel}) "
            f"-> {run_dir}",
            file=sys.stderr,
        )

    start = time.perf_counter()
    tokens_before = 0
    if resume_from is not None:
        tokens_before = int(read_json(resume_from / "trainer_state.json").get("num_input_tokens_seen", 0))
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - start

    trainer.save_model(str(run_dir / "adapter"))  # every rank (FSDP gathers shards); the main process writes
    if main:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
        tokens = int(trainer.state.num_input_tokens_seen)
        summary = {
            "method": cfg.adapter.method,
            "label": cfg.adapter.label(),
            "steps": int(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
            "final_loss": losses[-1] if losses else None,
            "train_loss": float(output.training_loss),  # mean over this session's steps
            "final_eval_loss": evals[-1] if evals else None,
            "tokens_seen": tokens,
            "wall_time_s": round(wall, 3),
            "tokens_per_s": round((tokens - tokens_before) / wall, 1) if wall > 0 else None,
            "trainable_params": params["trainable"],
            "total_params": params["total"],
            "precision": precision,
            "padding_fraction": padding.padding_fraction,  # of this session's training batches
            "world_size": state.num_processes,
            "parallel": parallel,
            "resumed_from": resume_from.name if resume_from else None,
        }
        write_json_atomic(run_dir / "train_summary.json", summary)
        print(
            f"done: {summary['steps']} steps, final loss {summary['final_loss']}, "
            f"{summary['tokens_per_s']} tok/s, {wall:.1f}s -> {run_dir}",
            file=sys.stderr,
        )
    state.wait_for_everyone()
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def _mapping(text: str) -> dict[str, Any]:
    """``'{"n": 500}'`` (JSON) or ``n=500,digits=3`` (values parsed as YAML scalars)."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    import yaml

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs or a JSON object, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _scaling(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


def _targets(text: str) -> list[str] | str:
    """``q_proj,v_proj`` -> a list; ``all-linear`` or a regex (``.*\\.(q|v)_proj``) stays a string."""
    if text == "all-linear" or any(c in text for c in "*^$|()[]\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


#: CLI flag -> (TrainConfig field, argparse kwargs); adapter fields are ``adapter.<name>``
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(help="base model: smollm2-135m, a local dir or hub id (default: the embedded base)")),
    "--data": (
        "data",
        dict(
            help="data source: reasoning (default), arith, logistic, gsm8k, slimorca, "
            "mathinstruct, a local .jsonl/.json/.csv file or a hub id"
        ),
    ),
    "--data-options": ("data_options", dict(type=_mapping, help="extra load_source options: KEY=VALUE,... or JSON")),
    "--field-map": ("field_map", dict(type=_mapping, help="record field -> column: prompt=question,response=answer")),
    "--output-dir": ("output_dir", dict(help="run dir (default: runs/<data>-<label>-s<seed>)")),
    "--method": ("adapter.method", dict(choices=METHODS, help="adapter method (default nora)")),
    "--r": ("adapter.r", dict(type=int, help="rank (default 8)")),
    "--alpha": ("adapter.alpha", dict(type=float, help="scaling numerator (default 2*r)")),
    "--dropout": ("adapter.dropout", dict(type=float, help="adapter dropout (default 0.05)")),
    "--activation": ("adapter.activation", dict(help="NoRA activation: silu (default), relu, gelu, tanh, identity")),
    "--granularity": ("adapter.granularity", dict(choices=("weight", "module"), help="NoRA granularity")),
    "--scaling": ("adapter.scaling", dict(type=_scaling, help="NoRA scaling: alpha/r (default), rslora or a number")),
    "--target-modules": ("adapter.target_modules", dict(type=_targets, help="comma list, regex or all-linear")),
    "--lr": ("lr", dict(type=float, help="peak learning rate (default 2e-4)")),
    "--epochs": ("epochs", dict(type=float, help="epochs when --max-steps is -1")),
    "--max-steps": ("max_steps", dict(type=int, help="optimizer steps; overrides --epochs (default -1: use --epochs)")),
    "--batch-size": ("batch_size", dict(type=int, help="per-device batch size (default 8)")),
    "--grad-accum": ("grad_accum", dict(type=int, help="gradient accumulation steps (default 1)")),
    "--max-length": ("max_length", dict(type=int, help="max tokens of prompt + response (default 256)")),
    "--warmup-ratio": ("warmup_ratio", dict(type=float, help="linear warmup fraction (default 0.05)")),
    "--lr-scheduler": ("lr_scheduler", dict(help="transformers scheduler name (default cosine)")),
    "--weight-decay": ("weight_decay", dict(type=float, help="AdamW weight decay (default 0)")),
    "--max-grad-norm": ("max_grad_norm", dict(type=float, help="gradient clipping (default 1.0; 0: off)")),
    "--gradient-checkpointing": ("gradient_checkpointing", dict(action=argparse.BooleanOptionalAction)),
    "--seed": ("seed", dict(type=int, help="adapter init / dropout seed (default 0)")),
    "--data-seed": ("data_seed", dict(type=int, help="splits and data order seed (default 0)")),
    "--val-size": ("val_size", dict(type=float, help="validation fraction when the source has none (default 0.1)")),
    "--test-size": ("test_size", dict(type=float, help="test fraction when the source has none (default 0.1)")),
    "--max-train-examples": ("max_train_examples", dict(type=_optional_int, help="cap the train split")),
    "--save-steps": ("save_steps", dict(type=int, help="checkpoint every N steps (default 50)")),
    "--save-total-limit": ("save_total_limit", dict(type=_optional_int, help="checkpoints kept (default 2)")),
    "--logging-steps": ("logging_steps", dict(type=int, help="log every N steps (default 10)")),
    "--eval-steps": ("eval_steps", dict(type=_optional_int, help="validation loss every N steps (default: none)")),
    "--resume": ("resume", dict(action=argparse.BooleanOptionalAction, help="continue from the last checkpoint")),
    "--overwrite": ("overwrite", dict(action=argparse.BooleanOptionalAction, help="delete a previous run here")),
    "--precision": (
        "precision",
        dict(choices=PRECISIONS, help="auto (bf16 on a GPU or a CPU with bf16 units, else fp32), fp32, bf16, fp16"),
    ),
    "--group-by-length": (
        "group_by_length",
        dict(action=argparse.BooleanOptionalAction, help="batches of similar length: less padding (default off)"),
    ),
    "--progress": ("progress", dict(action=argparse.BooleanOptionalAction, help="progress bar (default on)")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON file of TrainConfig fields; flags given here override it")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is fastest for tiny models)"
    )
    for flag, (_, kwargs) in FLAGS.items():
        parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file (if any) with every flag that was given applied on top."""
    base = TrainConfig.from_file(args.config) if getattr(args, "config", None) else TrainConfig()
    d = base.to_dict()
    for flag, (name, _) in FLAGS.items():
        dest = flag[2:].replace("-", "_")
        if dest not in vars(args):
            continue
        value = getattr(args, dest)
        if name.startswith("adapter."):
            d["adapter"][name.split(".", 1)[1]] = value
        else:
            d[name] = value
    return TrainConfig.from_dict(d)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = config_from_args(args)
        run_dir = train(cfg)
    except NonFiniteLossError as e:
        print(f"nora train: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as e:
        print(f"nora train: {e}", file=sys.stderr)
        return 2
    summary = run_dir / "train_summary.json"
    if summary.exists() and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(run_dir), **read_json(summary)}, indent=2))
    return 0
