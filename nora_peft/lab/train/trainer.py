"""The ``transformers.Trainer`` pieces: a NaN/inf guard, tokens/s in the logs, ``metrics.jsonl``, a progress bar,
and the ``TrainingArguments`` of a ``TrainConfig``."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from ...io import append_jsonl
from ..rundir import last_checkpoint
from .config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or non-finite adapter weights); the run stopped before saving them."""


def trainer_classes():
    """``(NoraTrainer, MetricsFile, Progress)``, built lazily (``nora --help`` must not import transformers)."""
    return nora_trainer_class(), metrics_file_class(), progress_class()


@functools.cache
def nora_trainer_class():
    """``Trainer`` + a NaN/inf guard (loss and saved weights) and a windowed tokens/s in every log line."""
    import torch
    from transformers import Trainer

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

    return NoraTrainer


@functools.cache
def metrics_file_class():
    """The callback that appends every log line to ``metrics.jsonl``."""
    from transformers import TrainerCallback

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

    return MetricsFile


@functools.cache
def progress_class():
    """The callback that draws a tqdm bar over optimizer steps."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

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

    return Progress


def check_report_to(targets: list[str]) -> None:
    """Fail before any work when a ``--report-to`` integration is unknown or its package is missing (Trainer would
    only find out once the data and model are loaded). The callbacks are built and dropped: they start nothing."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        for callback in get_reporting_integration_callbacks(targets):  # ValueError naming the supported ones
            callback()  # RuntimeError when the integration's package is not installed
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"--report-to {','.join(targets)}: {err}") from None


def training_arguments(cfg: TrainConfig, run_dir: Path, precision: str):
    """The ``TrainingArguments`` of ``cfg``: checkpoints under ``run_dir/checkpoints``, logs to ``cfg.report_to``."""
    import torch
    from transformers import TrainingArguments

    check_report_to(cfg.report_targets())
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
        use_cpu=not torch.cuda.is_available(),
        report_to=cfg.report_targets(),  # Trainer's integrations (tensorboard, mlflow, ...); none by default
        disable_tqdm=True,  # our Progress callback draws the bar
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
    )
