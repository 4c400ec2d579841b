"""Fixtures for the server tests: a tiny float64 Llama from config, an offline WordLevel tokenizer, 8 adapters
(NoRA of several ranks/activations, LoRA, rsLoRA; random init so each one changes the output), offline greedy
references from peft's ``PeftModel.generate``, and a real uvicorn server on a free loopback port in a thread."""

from __future__ import annotations

import copy
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import uvicorn
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nora_peft.methods import AdapterSpec, build_peft_model
from nora_peft.serve import Engine, ServeConfig, create_app
from nora_peft.serve.guard import uvicorn_config
from tests.tiny_models import VOCAB, tiny_causal_lm

WORDS = "the a cat dog sat on mat ran to house big small red blue one two three four five six seven eight".split()
PROMPTS = ["the cat sat on", "a big red dog ran to the house", "one two", "blue mat"]
MAX_TOKENS = 6
ADAPTER_SPECS = {
    "nora-silu-r4": AdapterSpec(r=4),
    "nora-relu-r8": AdapterSpec(r=8, activation="relu", target_modules=["q_proj", "down_proj"]),
    "nora-gelu-r2": AdapterSpec(r=2, activation="gelu", target_modules=["v_proj", "o_proj"]),
    "nora-tanh-r6": AdapterSpec(r=6, activation="tanh", scaling="rslora"),
    "nora-id-r3": AdapterSpec(r=3, activation="identity", target_modules=["up_proj", "gate_proj"]),
    "lora-r4": AdapterSpec(method="lora", r=4),
    "lora-r8": AdapterSpec(method="lora", r=8, target_modules=["k_proj", "down_proj"]),
    "rslora-r2": AdapterSpec(method="rslora", r=2),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def save_adapter(base: torch.nn.Module, spec: AdapterSpec, folder: Path, seed: int) -> None:
    spec = copy.deepcopy(spec)
    spec.extra = {"init_weights": False} if spec.method == "nora" else {"init_lora_weights": False}
    torch.manual_seed(seed)
    build_peft_model(copy.deepcopy(base), spec).save_pretrained(str(folder))


def offline_greedy(base: torch.nn.Module, tokenizer, adapter_dir: Path | None, prompt: str, max_tokens: int) -> str:
    """The reference: peft's PeftModel.generate, greedy, one unpadded prompt."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(torch.float64)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]])  # BOS first, as in training
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@dataclass
class ServeEnv:
    root: Path
    base: torch.nn.Module
    base_dir: Path
    adapters_dir: Path
    tokenizer: PreTrainedTokenizerFast
    expected: dict[tuple[str, str], str]  # (model name, prompt) -> offline greedy text


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory) -> ServeEnv:
    root = tmp_path_factory.mktemp("serve")
    tokenizer = make_tokenizer()
    base = tiny_causal_lm("llama", dtype=torch.float64)
    base_dir = root / "base"
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    adapters_dir = root / "adapters"
    for i, (name, spec) in enumerate(ADAPTER_SPECS.items()):
        save_adapter(base, spec, adapters_dir / name, seed=100 + i)
    expected = {}
    for name in ["base", *ADAPTER_SPECS]:
        folder = None if name == "base" else adapters_dir / name
        for prompt in PROMPTS:
            expected[(name, prompt)] = offline_greedy(base, tokenizer, folder, prompt, MAX_TOKENS)
    return ServeEnv(root, base, base_dir, adapters_dir, tokenizer, expected)


class ServerThread:
    """uvicorn on 127.0.0.1 with a pre-bound free port, in a daemon thread; ``stop()`` ends it."""

    def __init__(self, app, config: ServeConfig | None = None, **options) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, config or ServeConfig(), log_level="warning", lifespan="on", **options)
        self.server = uvicorn.Server(config)  # the settings `nora serve` runs with (read timeouts, limits)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def make_engine(env: ServeEnv, base: torch.nn.Module | None = None, **settings) -> Engine:
    """An engine over a copy of ``base`` (default: the env's) with these :class:`ServeConfig` settings."""
    options = dict(adapters_dir=str(env.adapters_dir), max_adapters=4, max_batch_size=16, batch_wait_ms=20.0)
    options.update(settings)
    return Engine(copy.deepcopy(base or env.base), env.tokenizer, ServeConfig(base_name="base", **options))


def serve(engine: Engine) -> ServerThread:
    """A started server for ``engine`` with uvicorn run as ``nora serve`` runs it (the engine's config)."""
    srv = ServerThread(create_app(engine), engine.config).start()
    srv.engine = engine
    return srv


@pytest.fixture(scope="module")
def server(serve_env):
    """A running server (LRU limit 4 < 8 adapters, so eviction and reloading are exercised)."""
    srv = serve(make_engine(serve_env))
    yield srv
    srv.stop()
