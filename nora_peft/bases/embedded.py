"""The embedded default base model: a small Llama and its tokenizer, pretrained here on text the project makes.

``nora base`` (or the first command that needs it) builds it into ``$NORA_CACHE/nora-tiny-llama-v1`` (default
``~/.cache/nora_peft``): a byte-level BPE tokenizer (~500 tokens, single-digit tokens), then a 4-layer Llama
(hidden 128, 4 heads, 2 KV heads, MLP 352, tied embeddings, ~0.8M parameters) pretrained for 300 steps of
16 x 128 tokens with AdamW + cosine on a generated corpus (about 2 minutes on 2 CPU cores). Same seed -> same weights
on the same machine. The size is chosen for CPU: the study's demo fine-tunes it a dozen times in minutes.

The corpus teaches the *language* of the fine-tuning tasks but not the tasks: templated sentences about people and
things, single arithmetic facts (``17 + 25 = 42``, ``0.512 * 0.488 = 0.2499``) and one-step questions in the plain
``### Question / ### Answer`` template. The multi-step word problems with worked solutions and the logistic-map
iterations that the study fine-tunes on never appear, so fine-tuning has capacity-hungry work to do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

from ..io import cache_dir, save_pretrained_atomically

#: names and items of the pretraining corpus; the lab's synthetic tasks reuse them (words the base has seen)
NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia", "Oto"]
ITEMS = ["apples", "books", "coins", "stamps", "marbles", "cards", "shells", "pencils", "stickers", "beads"]
DEFAULT_BASE_NAME = "nora-tiny-llama-v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MODEL_SIZE = dict(
    hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)


def default_base_path() -> Path:
    """Where the embedded default base lives: ``nora_peft.io.cache_dir() / DEFAULT_BASE_NAME``."""
    return cache_dir() / DEFAULT_BASE_NAME


def pretraining_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` short documents of generated text (see the module docstring for what is, and is not, in it)."""
    rng = random.Random(f"corpus-{seed}")
    verbs = ["has", "keeps", "counts", "wants", "sees", "finds", "sells", "collects"]
    docs = []
    for _ in range(n):
        kind = rng.random()
        name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
        if kind < 0.3:
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            docs.append(
                f"{name} {rng.choice(verbs)} {a} {item}. {other} {rng.choice(verbs)} {b} {item}. "
                f"Together they have {a + b} {item}. {name} is a friend of {other}."
            )
        elif kind < 0.55:
            facts = []
            for _ in range(rng.randint(3, 6)):
                a, b = rng.randint(0, 99), rng.randint(1, 12)
                op = rng.choice("+-*")
                facts.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}.")
            docs.append(" ".join(facts))
        elif kind < 0.75:
            facts = []
            for _ in range(rng.randint(2, 4)):
                x, y = round(rng.uniform(0.01, 0.99), 3), round(rng.uniform(0.01, 0.99), 3)
                facts.append(f"{x:.3f} * {y:.3f} = {x * y:.4f}. 1 - {x:.3f} = {1 - x:.3f}.")
            docs.append(" ".join(facts))
        else:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            op, val = rng.choice([("plus", a + b), ("times", a * b), ("minus", a - b)])
            docs.append(f"### Question:\nWhat is {a} {op} {b}?\n\n### Answer:\n{val}")
    return docs


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE (digits always split into single tokens) as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def token_windows(docs: list[str], tokenizer, seq_len: int):
    """One long stream of documents (each between bos and eos) cut into fixed ``seq_len`` windows, as a tensor
    ``[n, seq_len]`` (standard LM pretraining; the ragged tail is dropped)."""
    import torch

    stream: list[int] = []
    for doc in docs:
        stream += [
            tokenizer.bos_token_id,
            *tokenizer(doc, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
    return torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)


def tiny_llama(tokenizer, model_size: dict | None = None):
    """A freshly initialised Llama of ``model_size`` (default ``MODEL_SIZE``) with tied embeddings for
    ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(model_size or MODEL_SIZE),
    )
    return LlamaForCausalLM(config)


def pretrain(model, windows, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool) -> float:
    """``steps`` of AdamW (betas 0.9/0.95, weight decay 0.01, clip 1.0) with linear warmup over 5% then cosine, on
    random batches of ``windows``; returns the last step's loss."""
    import torch

    start = time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        batch = windows[torch.randint(0, len(windows), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if progress and (step % 50 == 0 or step == steps - 1):
            rate = (step + 1) * batch_size * windows.shape[1] / (time.time() - start)
            print(f"[nora base] step {step + 1}/{steps} loss {loss_value:.3f} ({rate:,.0f} tokens/s)", flush=True)
    model.eval()
    return loss_value


def build_base(
    out_dir: str | os.PathLike,
    *,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    documents: int = 20000,
    model_size: dict | None = None,
    progress: bool = True,
) -> Path:
    """Pretrain the base model and save it (model, tokenizer, ``build_info.json``) atomically into ``out_dir``."""
    import torch

    out_dir = Path(out_dir)
    start = time.time()
    torch.manual_seed(seed)
    docs = pretraining_corpus(documents, seed=seed)
    tokenizer = build_tokenizer(docs[: min(len(docs), 20000)])
    data = token_windows(docs, tokenizer, seq_len)
    held_out, train = data[:64], data[64:]
    model = tiny_llama(tokenizer, model_size)
    loss_value = pretrain(model, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    with torch.no_grad():
        held_out_loss = model(input_ids=held_out, labels=held_out).loss.item()
    info = {
        "name": DEFAULT_BASE_NAME,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "final_train_loss": loss_value,
        "held_out_loss": held_out_loss,
        "uniform_loss": math.log(len(tokenizer)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - start, 1),
        "corpus": "bases.embedded.pretraining_corpus: templated sentences, arithmetic facts, one-step questions",
        "documents": documents,
        "tokens_seen": steps * batch_size * seq_len,
    }
    save_pretrained_atomically(out_dir, model, tokenizer, "build_info.json", info)
    if progress:
        print(
            f"[nora base] saved to {out_dir}: held-out loss {held_out_loss:.3f} vs uniform "
            f"{info['uniform_loss']:.3f}, {info['seconds']}s",
            flush=True,
        )
    return out_dir


def ensure_default_base(path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The default base's folder, building it first if it is missing (one builder at a time, via a lock file)."""
    import fcntl

    path = Path(path) if path else default_base_path()
    if (path / "build_info.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the finished build
        if not (path / "build_info.json").exists():
            if progress:
                print(f"[nora base] building the embedded default base model into {path} (once, ~1-3 min)", flush=True)
            build_base(path, progress=progress)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nora base``."""
    parser.add_argument("--out", default=None, help=f"output folder (default: {default_base_path()})")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a model")


def main(args: argparse.Namespace) -> int:
    """``nora base``: build the base into ``--out`` (default: the cache) unless it is already there (``--force``)."""
    out = Path(args.out) if args.out else default_base_path()
    if (out / "build_info.json").exists() and not args.force:
        info = json.loads((out / "build_info.json").read_text())
        print(f"{out} already holds a base model (held-out loss {info['held_out_loss']:.3f}); --force rebuilds it")
        return 0
    build_base(out, steps=args.steps, seed=args.seed)
    return 0
