"""``TrainConfig``: everything that defines one fine-tuning run (every field is also a ``nora train`` flag)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...bases.named import training_defaults
from ...methods import AdapterSpec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: fields that say *how* to run, not *what* to train: a run dir's identity ignores them
RUN_CONTROL_FIELDS = ("output_dir", "resume", "overwrite", "progress", "report_to")

#: fields a named base may recommend a value for (``bases.named.training_defaults``), with the value used when
#: neither the user nor the base gives one. ``None`` in a ``TrainConfig`` means "not given": resolved on creation.
GLOBAL_DEFAULTS: dict[str, Any] = {"lr": 2e-4}


@dataclass
class TrainConfig:
    """Everything that defines one fine-tuning run. Every field is also a ``nora train`` flag.

    The defaults make ``nora train`` with no arguments a quick demo (about a minute on two CPU cores with
    ``--threads 1``): the embedded default base model, the synthetic ``reasoning`` mix (2,000 records -> 1,600 for
    training), NoRA r=8 on q/v, one epoch = 200 steps of batch 8. ``lr=2e-4`` is the usual LoRA fine-tuning rate;
    raise it (1e-3) for the tiny embedded base, lower it (5e-5) if the loss turns NaN on a large model.
    """

    model: str | None = None  # None -> the embedded default base (nora_peft.bases.embedded)
    data: str = "reasoning"  # a load_source name (arith, logistic, reasoning, gsm8k, ...) or a local file / hub id
    data_options: dict = field(default_factory=dict)  # extra keyword options for data.load_source
    field_map: dict | None = None  # {"prompt": "question", "response": "answer", ...} for local files / hub ids
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    output_dir: str = ""  # "" -> runs/<data>-<adapter label>-s<seed>
    lr: float | None = None  # None -> the base's recommended lr, else GLOBAL_DEFAULTS["lr"]
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
    report_to: str = "none"  # Trainer integrations, comma-separated (tensorboard, mlflow, wandb, ...); none: nothing

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterSpec(**self.adapter)
        self.defaults_from_base = self._fill_defaults()
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

    def _fill_defaults(self) -> dict[str, Any]:
        """Set every ``None`` field of ``GLOBAL_DEFAULTS`` from the base's recommendation, else the global value;
        return the ones the base gave."""
        recommended = training_defaults(self.model)
        from_base = {}
        for name, value in GLOBAL_DEFAULTS.items():
            if getattr(self, name) is None:
                from_base.update({name: recommended[name]} if name in recommended else {})
                setattr(self, name, recommended.get(name, value))
        return from_base

    def report_targets(self) -> list[str]:
        """``report_to`` as the list ``TrainingArguments`` takes (``[]`` for "none")."""
        targets = [t.strip() for t in self.report_to.split(",") if t.strip()]
        return [] if targets in ([], ["none"]) else targets

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
        return cls.from_dict(read_config_file(path))

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


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of TrainConfig fields in a YAML (``.yaml``/``.yml``) or JSON file, as written (nothing filled in,
    so that a field the file leaves out can still take its base's default)."""
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
    return d
