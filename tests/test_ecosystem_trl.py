"""TRL with NoRA (issue 9, finding 7): ``SFTTrainer(peft_config=NoraConfig(...))`` trains NoRA layers only, and the
saved adapter reloads to the trained model's exact logits (in fp32; TRL's bf16 default is the documented caveat)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import nora_peft  # noqa: F401  (registers NoRA)
from nora_peft import NoraConfig
from nora_peft.tuner.layer import NoraLayer

from .test_ecosystem_transformers import tiny_tokenizer
from .tiny_models import input_ids, tiny_causal_lm

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'nora-peft[trl]'")


def _sft_config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "sft"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        max_length=24,
        seed=0,
    )
    return trl.SFTConfig(**{**kwargs, **overrides})


def _sft_trainer(tmp_path, **overrides):
    from datasets import Dataset

    texts = ["abcabcabcabc", "xyzxyzxyzxyz", "abcxyzabcxyz", "cabcabcabcab"] * 4
    return trl.SFTTrainer(
        model=tiny_causal_lm("llama"),
        args=_sft_config(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tiny_tokenizer(),
        peft_config=NoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids()).logits.float()


def test_sft_trainer_with_nora_config_trains_and_reloads_exactly(tmp_path):
    trainer = _sft_trainer(tmp_path, bf16=False)
    peft_model = trainer.model
    assert isinstance(peft_model, PeftModel) and any(isinstance(m, NoraLayer) for m in peft_model.modules())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".nora_up." in n or ".nora_down." in n for n in trainable)
    trainer.train()
    downs = [m.nora_down["default"].weight for m in peft_model.modules() if isinstance(m, NoraLayer)]
    assert all(w.abs().sum() > 0 for w in downs)  # W_down starts at zero: training moved it

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(peft_model), rtol=0, atol=0)


def test_sft_default_bf16_gap_is_accelerates_autocast_not_the_adapter(tmp_path):
    """The caveat docs/ecosystem.md documents. On CPU ``SFTConfig`` defaults to bf16; accelerate then wraps the
    trained model's forward in bf16 autocast, and the wrapper stays after training. The saved adapter is exact: it
    matches the unwrapped model in fp32 and the wrapped one under bf16 autocast."""
    trainer = _sft_trainer(tmp_path)
    assert trainer.args.bf16 is True
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "adapter")
    fp32 = _logits(reloaded)
    assert (_logits(trainer.model) - fp32).abs().max() > 1e-5  # the gap users see
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(_logits(reloaded), _logits(trainer.model), rtol=0, atol=0)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    torch.testing.assert_close(_logits(unwrapped), fp32, rtol=0, atol=0)
