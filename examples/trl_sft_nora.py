"""Fine-tune with TRL's SFTTrainer and a NoRA adapter, save it, reload it with plain peft, and check it matches.

    pip install 'nora-peft[trl]'
    python examples/trl_sft_nora.py --model HuggingFaceTB/SmolLM2-135M-Instruct --out runs/trl-nora
    python examples/trl_sft_nora.py --model /path/to/local/model --steps 10 --bf16

The only NoRA-specific lines are ``import nora_peft`` and ``peft_config=NoraConfig(...)``; everything else is TRL.
``--bf16`` keeps TRL's CPU default (bf16 autocast). accelerate then wraps the trained model's forward in autocast, and
the wrapper stays after training: that model's logits differ from the fp32 reload by bf16 rounding, while the saved
adapter itself is exact (see docs/ecosystem.md).
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import nora_peft  # noqa: F401  (registers the "NORA" peft type)
from nora_peft import NoraConfig


def toy_dataset(n: int = 64) -> Dataset:
    """Prompt/completion pairs (TRL computes the loss on the completion only)."""
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)][:n]
    return Dataset.from_dict(
        {"prompt": [f"What is {a} times {b}? " for a, b in pairs], "completion": [f"{a * b}" for a, b in pairs]}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="base model: hub id or local folder")
    parser.add_argument("--out", default="runs/trl-nora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
        processing_class=tokenizer,
        train_dataset=toy_dataset(),
        peft_config=NoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"]),
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=2e-4,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            bf16=args.bf16,  # TRL's default is True (on CPU too)
            use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU-only machine without it
        ),
    )
    trainer.train()
    trainer.save_model(f"{args.out}/adapter")  # adapter_config.json ("peft_type": "NORA") + safetensors

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), f"{args.out}/adapter")
    ids = tokenizer("What is 7 times 8? ", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = reloaded.eval()(ids).logits
        gap = (trainer.model.eval()(ids).logits.float() - reference).abs().max().item()
        # unwrap_model(keep_fp32_wrapper=False) removes accelerate's autocast wrapper in place, so it comes last
        unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        exact = (unwrapped(ids).logits - reference).abs().max().item()
    print(
        f"adapter saved to {args.out}/adapter; max |trained - reloaded| logit: {gap:.2e} as trained, "
        f"{exact:.2e} unwrapped"
    )


if __name__ == "__main__":
    main()
