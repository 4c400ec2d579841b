"""Greedy decode with a static KV cache; on CUDA the one-token step is captured once as a CUDA graph.

Eager ``generate`` on a GPU is bound by the host: every decode step launches hundreds of small kernels (each adapted
layer adds several), and at batch 1 the GPU waits for Python. :class:`StaticDecoder` makes every tensor a decode step
touches static -- transformers' ``StaticCache`` for keys and values, fixed buffers for the token, its position, the
attention mask, the per-row "finished" flags and the output -- so the whole step (forward, argmax, stop bookkeeping)
can be recorded once as a ``torch.cuda.CUDAGraph`` and replayed with one launch per token. On a CPU the same loop runs
eagerly (``graph=False``): one code path, so merged and unmerged variants are always measured the same way.

The output equals ``model.generate(..., do_sample=False)`` token for token (left padding, per-row stop: a row that
emitted a stop token gets ``pad_token_id`` after it, and decoding ends when every row has stopped), for any causal
LM whose forward takes ``position_ids``, ``past_key_values`` and a 4D ``attention_mask`` (Llama, Qwen2, Phi-3, ...;
peft models around them, NoRA or LoRA, merged or not)::

    decoder = StaticDecoder(model, batch_size=8, max_cache_len=512)   # once per (model, batch size)
    out = decoder.generate(input_ids, attention_mask, max_new_tokens=64, eos_token_id=tok.eos_token_id)
    # out: (8, prompt_len + n) like generate's sequences; n <= 64 (stops early when every row has stopped)

A decoder is reused across calls (any prompt with ``prompt_len + max_new_tokens <= max_cache_len``); the graph is
captured on the first call and replayed afterwards. :func:`greedy_decode` is the one-shot form.

Host work per token is one graph replay; the "all rows finished?" check (a device-to-host sync) runs every
``check_every`` steps, and the few extra steps it may run are cut from the output, which is trimmed exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn

#: attention implementations that read the boolean 4D mask this module builds (True = attend)
BOOL_MASK_ATTENTION = ("sdpa", "nora_folded_sdpa")
#: implementations that add a float mask to the scores (0 = attend, dtype minimum = masked)
ADDITIVE_MASK_ATTENTION = ("eager",)


def _inner(model: nn.Module) -> nn.Module:
    """The causal LM inside peft wrappers (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_parameters(model: nn.Module) -> set[str]:
    """Keyword arguments the innermost causal LM's ``forward`` names."""
    return set(inspect.signature(_inner(model).forward).parameters)


def _vocab_rows(model: nn.Module) -> int:
    """How many token ids the logits hold: the output embedding's rows (some checkpoints pad it past the config's
    ``vocab_size``), else the config's vocabulary."""
    head = _inner(model).get_output_embeddings() if hasattr(_inner(model), "get_output_embeddings") else None
    rows = getattr(getattr(head, "weight", None), "shape", (0,))[0]
    return max(rows, model.config.get_text_config().vocab_size)


class StaticDecoder:
    """Greedy decoding of batches of up to ``batch_size`` rows, up to ``max_cache_len`` tokens (prompt + new) per row.

    Args:
        model: a causal LM (or a peft model around one) in eval mode, on its device.
        batch_size: rows per call, at most (the cache and graph are shaped by it; fewer rows are filled up).
        max_cache_len: prompt plus new tokens, at most, per call.
        graph: capture the decode step as a CUDA graph; ``None``: on CUDA devices, not elsewhere.
        check_every: decode steps between checks whether every row has stopped (each check syncs the host).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        max_cache_len: int,
        graph: bool | None = None,
        check_every: int = 8,
    ) -> None:
        from transformers import StaticCache

        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.graph = self.device.type == "cuda" if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}: pass graph=False")
        if batch_size < 1 or max_cache_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_cache_len >= 2 (got {batch_size}, {max_cache_len})")
        self.impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if self.impl not in BOOL_MASK_ATTENTION + ADDITIVE_MASK_ATTENTION:
            raise ValueError(
                f"static decode builds explicit 4D attention masks, which attention implementation {self.impl!r} "
                f"does not take; switch the model with model.set_attn_implementation('sdpa')"
            )
        self.cache = StaticCache(config=self.config, max_cache_len=max_cache_len)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError(
                "static decode supports full-attention models only; this model has sliding-window layers "
                "(config.sliding_window): use model.generate for it"
            )
        self.batch_size, self.max_cache_len, self.check_every = batch_size, max_cache_len, max(1, check_every)
        self.keeps_logits = "logits_to_keep" in _forward_parameters(model)
        self._captured: torch.cuda.CUDAGraph | None = None
        self._alloc_buffers()

    def _alloc_buffers(self) -> None:
        """The step's inputs and outputs, allocated once so that a captured graph always reads and writes them."""
        b, n, dev = self.batch_size, self.max_cache_len, self.device
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=dev)  # the token fed at cache position `cpos`
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=dev)  # its position id (left padding: per row)
        self.cpos = torch.zeros(1, dtype=torch.long, device=dev)  # where its key/value are written
        self.keys = torch.arange(n, device=dev)
        self.key_valid = torch.ones(b, n, dtype=torch.bool, device=dev)  # False at the prompt's padding
        self.finished = torch.zeros(b, dtype=torch.bool, device=dev)
        self.seq = torch.zeros(b, n, dtype=torch.long, device=dev)  # every row's tokens by cache position
        self.stop = torch.zeros(_vocab_rows(self.model), dtype=torch.bool, device=dev)
        self.pad = torch.zeros((), dtype=torch.long, device=dev)

    def _forward_kwargs(self) -> dict:
        return {"use_cache": True, **({"logits_to_keep": 1} if self.keeps_logits else {})}

    def _step(self) -> None:
        """One token for every row, entirely on the device (this is what the CUDA graph records)."""
        allowed = (self.key_valid & (self.keys <= self.cpos))[:, None, None, :]
        if self.impl in ADDITIVE_MASK_ATTENTION:
            dtype = next(self.model.parameters()).dtype
            allowed = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=self.device).masked_fill_(
                allowed, 0
            )
        logits = self.model(
            input_ids=self.tok,
            attention_mask=allowed,
            position_ids=self.pos,
            past_key_values=self.cache,
            **self._forward_kwargs(),
        ).logits
        nxt = torch.where(self.finished, self.pad, logits[:, -1].argmax(-1))
        self.finished |= self.stop[nxt]
        self.seq.index_copy_(1, self.cpos + 1, nxt[:, None])
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.cpos.add_(1)

    def _run_step(self) -> None:
        if not self.graph:
            self._step()
        elif self._captured is None:
            # the first step runs eagerly on a side stream (lazy inits, cuBLAS workspaces), then the next is recorded;
            # recording executes nothing, so every step is still run exactly once
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self._captured = graph
            self._captured.replay()
        else:
            self._captured.replay()

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
        b, length = input_ids.shape
        if not 1 <= b <= self.batch_size:
            raise ValueError(f"this decoder was built for batch_size={self.batch_size}, got {b} rows")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds max_cache_len={self.max_cache_len}; "
                "build the decoder with a larger max_cache_len"
            )
        if attention_mask is not None and (
            attention_mask.shape != input_ids.shape or (attention_mask.sum(1) == 0).any()
        ):
            raise ValueError("attention_mask must have input_ids' shape and at least one 1 per row (left padding)")

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The prompt forward (eager: its shape changes with the prompt), then the step buffers for the first token."""
        length = input_ids.shape[1]
        self.cache.reset()
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        padded = not bool(attention_mask.all())
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask if padded else None,  # as generate: no mask without padding
            position_ids=position_ids,
            past_key_values=self.cache,
            **self._forward_kwargs(),
        ).logits
        first = logits[:, -1].argmax(-1)
        self.finished.copy_(self.stop[first])
        self.seq[:, :length].copy_(input_ids)
        self.seq[:, length].copy_(first)
        self.tok.copy_(first[:, None])
        self.pos.copy_(position_ids[:, -1:] + 1)
        self.cpos.fill_(length)
        self.key_valid.fill_(True)
        self.key_valid[:, :length].copy_(attention_mask.bool())

    def _set_stops(self, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None) -> None:
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        bad = [i for i in ids if not 0 <= i < self.stop.numel()]
        if bad:
            raise ValueError(f"eos_token_id {bad} outside the vocabulary (0..{self.stop.numel() - 1})")
        self.stop.zero_()
        if ids:
            self.stop[torch.tensor(ids, device=self.device)] = True
        self.pad.fill_(pad_token_id if pad_token_id is not None else (ids[0] if ids else 0))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` (left-padded; ``attention_mask`` 1 on tokens, 0 on padding).

        Up to the decoder's ``batch_size`` rows (a smaller batch reuses the same cache and graph).
        Returns ``(rows, prompt_len + n)`` token ids as ``generate`` returns them: ``n <= max_new_tokens`` new tokens,
        ``n`` smaller only when every row emitted one of ``eos_token_id`` (then ``pad_token_id`` follows it in its
        row; default: the first stop id). ``eos_token_id=None`` decodes exactly ``max_new_tokens``.
        """
        self._check(input_ids, attention_mask, max_new_tokens)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        (rows, length), fill = input_ids.shape, self.batch_size - input_ids.shape[0]
        if fill:  # a smaller batch fills the decoder's rows with copies of its first row, whose output is dropped
            input_ids = torch.cat([input_ids, input_ids[:1].expand(fill, -1)])
            mask = torch.cat([mask, mask[:1].expand(fill, -1)])
        with torch.inference_mode():
            self._set_stops(eos_token_id, pad_token_id)
            self._prefill(input_ids, mask)
            self.finished[rows:] = True  # the filler rows never hold decoding up
            steps = 1
            while steps < max_new_tokens:
                if steps % self.check_every == 0 and bool(self.finished.all()):
                    break
                self._run_step()
                steps += 1
            new = self.seq[:rows, length : length + steps].clone()
        return torch.cat([input_ids[:rows], new[:, : _kept_length(new, self.stop)]], dim=1)


def _kept_length(new: torch.Tensor, stop: torch.Tensor) -> int:
    """How many of the decoded tokens ``generate`` would return: up to and including the step at which the last row
    stopped, or all of them if some row never stopped."""
    hit = stop[new]  # (B, n) stop tokens
    if not bool(hit.any(1).all()):
        return new.shape[1]
    first = hit.float().argmax(1)  # each row's first stop
    return int(first.max()) + 1


def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    graph: bool | None = None,
) -> torch.Tensor:
    """One-shot :meth:`StaticDecoder.generate` (a decoder sized to this call; keep a :class:`StaticDecoder` to reuse
    its cache and CUDA graph across calls)."""
    decoder = StaticDecoder(
        model, batch_size=input_ids.shape[0], max_cache_len=input_ids.shape[1] + max_new_tokens, graph=graph
    )
    return decoder.generate(
        input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
