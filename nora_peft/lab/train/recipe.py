"""``train(cfg)``: one fine-tuning run as a recipe whose steps are methods (torchtune's shape).

The constructor decides what to do with the run dir (fresh / resume / done / overwrite); ``prepare`` builds
everything that can fail on bad input (data, model, adapter) before any work; ``write_run_files`` records the run
(main process only); ``build_trainer`` wires the ``transformers.Trainer``; ``fit`` trains (resuming from the newest
complete checkpoint); ``finish`` saves the adapter and writes ``train_summary.json`` last, atomically.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ...io import read_json, write_json_atomic
from ..rundir import check_run_dir, clear_run_dir, last_checkpoint, trim_metrics
from .config import TrainConfig
from .data import PaddingCounter, load_splits, tokenize_split
from .precision import base_dtype, resolve_precision
from .trainer import trainer_classes, training_arguments


class FinetuneRecipe:
    """One run of ``cfg``; ``callbacks`` are extra ``TrainerCallback`` objects (tests use them to interrupt a run)."""

    def __init__(self, cfg: TrainConfig, callbacks: list | None = None) -> None:
        from accelerate import PartialState

        from ..launch import warn_if_single_process

        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.run_dir = cfg.resolved_output_dir()
        self.action = check_run_dir(cfg, self.run_dir)
        self.precision = resolve_precision(cfg.precision)
        self.args = training_arguments(cfg, self.run_dir, self.precision)  # sets up torch.distributed under torchrun
        self.state = PartialState()
        warn_if_single_process(self.state.num_processes)  # e.g. `accelerate launch --cpu --num_processes 2` starts one
        self.main = self.state.is_main_process

    def prepare(self) -> None:
        """Data, base model and adapter: everything that can fail on bad input, before any training work."""
        import torch
        from transformers import set_seed

        from ...bases.named import load_model_and_tokenizer
        from ...methods import build_peft_model, count_parameters

        cfg = self.cfg
        set_seed(cfg.seed)
        self.splits = load_splits(cfg)
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, dtype=base_dtype(self.precision))
        self.train_ds, self.train_stats = tokenize_split(self.splits["train"], self.tokenizer, cfg)
        self.eval_ds = None
        if cfg.eval_steps:
            if not self.splits["validation"]:
                raise ValueError("eval_steps is set but the validation split is empty; raise --val-size or unset it.")
            self.eval_ds, _ = tokenize_split(self.splits["validation"], self.tokenizer, cfg)
        set_seed(cfg.seed)  # adapter init does not depend on how much randomness data loading used
        model = build_peft_model(model, cfg.adapter)
        for p in model.parameters():  # adapters train in fp32 even on a bf16/fp16 base (autocast does the rest)
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        self.model = model
        self.params = count_parameters(model)

    def write_run_files(self) -> None:
        """config.json and splits.json (main process only); on resume, trims metrics past the checkpoint."""
        from ..data import describe_splits

        run_dir = self.run_dir
        self.resume_from = last_checkpoint(run_dir) if self.action == "resume" else None
        self.state.wait_for_everyone()
        if self.main:
            if self.action == "overwrite":
                clear_run_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "config.json", self.cfg.to_dict())
            description = describe_splits(self.splits, source=self.cfg.data, seed=self.cfg.data_seed)
            write_json_atomic(run_dir / "splits.json", {**description, "train_stats": self.train_stats})
            if self.resume_from is None:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            else:
                trim_metrics(run_dir / "metrics.jsonl", int(self.resume_from.name.split("-")[-1]))
                print(f"Resuming {run_dir} from {self.resume_from.name}", file=sys.stderr)
        self.state.wait_for_everyone()

    def build_trainer(self) -> None:
        from transformers import PrinterCallback, ProgressCallback

        NoraTrainer, MetricsFile, Progress = trainer_classes()
        self.padding = PaddingCounter(self.tokenizer.pad_token_id)
        trainer = NoraTrainer(
            model=self.model,
            args=self.args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            data_collator=self.padding,
            processing_class=self.tokenizer,
            callbacks=[MetricsFile(self.run_dir / "metrics.jsonl"), *self.callbacks],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        if self.cfg.progress:
            trainer.add_callback(Progress())
        self.parallel = "fsdp" if trainer.is_fsdp_enabled else "ddp" if self.state.num_processes > 1 else "none"
        self.trainer = trainer
        if self.main:
            print(self.header(), file=sys.stderr)

    def header(self) -> str:
        """The run's first line: what trains on what, with which lr (and whether the base recommended it)."""
        import torch

        cfg, params = self.cfg, self.params
        n = torch.get_num_threads()
        threads = "" if torch.cuda.is_available() else f", {n} thread{'s' if n != 1 else ''}"
        lr = f"lr {cfg.lr:g}"
        if cfg.defaults_from_base:
            given = ", ".join(f"--{k.replace('_', '-')}" for k in cfg.defaults_from_base)
            lr += f" (the base's default; {given} overrides)"
        return (
            f"nora train: {cfg.adapter.label()} on {cfg.model or 'embedded base'} | {lr} | data {cfg.data} "
            f"({len(self.train_ds)} train examples, {self.train_stats}) | trainable {params['trainable']:,} of "
            f"{params['total']:,} params | {self.precision} | {self.args.device} x{self.state.num_processes}{threads} "
            f"({self.parallel}) -> {self.run_dir}"
        )

    def fit(self) -> None:
        start = time.perf_counter()
        self.tokens_before = 0
        if self.resume_from is not None:
            state = read_json(self.resume_from / "trainer_state.json")
            self.tokens_before = int(state.get("num_input_tokens_seen", 0))
        resume = str(self.resume_from) if self.resume_from else None
        self.output = self.trainer.train(resume_from_checkpoint=resume)
        self.wall = time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        trainer, cfg, wall = self.trainer, self.cfg, self.wall
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
        tokens = int(trainer.state.num_input_tokens_seen)
        return {
            "method": cfg.adapter.method,
            "label": cfg.adapter.label(),
            "steps": int(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
            "final_loss": losses[-1] if losses else None,
            "train_loss": float(self.output.training_loss),  # mean over this session's steps
            "final_eval_loss": evals[-1] if evals else None,
            "tokens_seen": tokens,
            "wall_time_s": round(wall, 3),
            "tokens_per_s": round((tokens - self.tokens_before) / wall, 1) if wall > 0 else None,
            "trainable_params": self.params["trainable"],
            "total_params": self.params["total"],
            "precision": self.precision,
            "padding_fraction": self.padding.padding_fraction,  # of this session's training batches
            "world_size": self.state.num_processes,
            "parallel": self.parallel,
            "resumed_from": self.resume_from.name if self.resume_from else None,
        }

    def finish(self) -> None:
        """Save the adapter (every rank: FSDP gathers shards), then ``train_summary.json`` last (main process)."""
        self.trainer.save_model(str(self.run_dir / "adapter"))
        if self.main:
            summary = self.summary()
            write_json_atomic(self.run_dir / "train_summary.json", summary)
            print(
                f"done: {summary['steps']} steps, final loss {summary['final_loss']}, "
                f"{summary['tokens_per_s']} tok/s, {self.wall:.1f}s -> {self.run_dir}",
                file=sys.stderr,
            )
        self.state.wait_for_everyone()


def train(cfg: TrainConfig, *, callbacks: list | None = None) -> Path:
    """Fine-tune ``cfg.model`` with ``cfg.adapter`` on ``cfg.data``; return the run dir.

    A finished run (``train_summary.json`` exists) is never retrained: it raises, unless ``overwrite`` (delete and
    retrain) or ``resume`` (return it as is). ``resume`` continues an unfinished run from its newest complete
    checkpoint with the same data order, optimizer, scheduler and RNG state (and starts fresh when there is none).
    """
    recipe = FinetuneRecipe(cfg, callbacks)
    if recipe.action == "done":
        print(f"Run {recipe.run_dir} already finished; returning it (--resume).", file=sys.stderr)
        return recipe.run_dir
    recipe.prepare()
    recipe.write_run_files()
    recipe.build_trainer()
    recipe.fit()
    recipe.finish()
    return recipe.run_dir
