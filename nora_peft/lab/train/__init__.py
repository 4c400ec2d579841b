"""``TrainConfig`` -> a ``transformers.Trainer`` run -> a run dir; ``nora train``.

Modules: ``config`` (TrainConfig), ``data`` (splits, tokenization, the padding collator), ``precision``,
``trainer`` (Trainer subclass, callbacks, TrainingArguments), ``recipe`` (``train()`` as named steps), ``cli``;
the run dir contract is ``nora_peft.lab.rundir``.

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

from ..rundir import RUN_DIRS, RUN_FILES, check_run_dir, last_checkpoint
from .cli import FLAGS, add_arguments, config_from_args, main, parse_mapping
from .config import PRECISIONS, TrainConfig
from .data import PaddingCounter, collate, load_splits, tokenize_split
from .precision import base_dtype, cpu_has_bf16, resolve_precision
from .recipe import FinetuneRecipe, train
from .trainer import NonFiniteLossError, training_arguments

__all__ = [
    "FLAGS",
    "PRECISIONS",
    "RUN_DIRS",
    "RUN_FILES",
    "FinetuneRecipe",
    "NonFiniteLossError",
    "PaddingCounter",
    "TrainConfig",
    "add_arguments",
    "base_dtype",
    "check_run_dir",
    "collate",
    "config_from_args",
    "cpu_has_bf16",
    "last_checkpoint",
    "load_splits",
    "main",
    "parse_mapping",
    "resolve_precision",
    "tokenize_split",
    "train",
    "training_arguments",
]
