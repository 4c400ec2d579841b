"""The checks a generation request passes before the engine sees it, cheapest first: unsupported options, sampling
bounds, stop strings, well-formed text, the prompt's size in characters (a chat's templated text included), token ids
in the vocabulary; then tokenizing in a worker thread, one at a time (a burst of long prompts cannot take every
core, and the event loop keeps answering)."""

from __future__ import annotations

import threading
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..prompt import format_chat
from .errors import AdapterError
from .protocol import MAX_PROMPTS, MIN_TEMPERATURE, UNSUPPORTED, ChatRequest, CompletionRequest, SamplingRequest

#: characters a chat template adds per message at the least (role markers, separators): counted before templating
MIN_CHARS_PER_MESSAGE = 2


def check_text(value: str, param: str) -> None:
    """A 400 unless ``value`` is well-formed Unicode (a lone surrogate cannot be tokenized or echoed)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError(
            f"{param} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text.", param=param
        ) from None


class Admission:
    """The request checks (none needs the tokenizer until :meth:`encode` / :meth:`encode_chat`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.config = engine.config
        embeddings = engine.model.get_input_embeddings()
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or engine.model.config.vocab_size)
        self.max_prompt_chars = self.config.max_prompt_chars or 32 * engine.max_prompt_tokens
        self._tokenize_lock = threading.Lock()

    def check(self, body: SamplingRequest) -> list[str]:
        """Unsupported options, sampling bounds and stop strings; returns the stop strings."""
        for name in UNSUPPORTED:
            value = (body.model_extra or {}).get(name)
            if value in (None, False, 0, [], {}) or (name == "response_format" and value == {"type": "text"}):
                continue
            raise AdapterError(f"'{name}' is not supported by nora serve; leave it out of the request.", param=name)
        if 0 < body.temperature < MIN_TEMPERATURE:
            raise AdapterError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}; got {body.temperature:g}.",
                param="temperature",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        limit, chars = self.config.max_stop_strings, self.config.max_stop_chars
        if len(stop) > limit:
            raise AdapterError(f"stop has {len(stop)} strings, over the limit of {limit}.", param="stop")
        for s in stop:
            if not s or len(s) > chars:
                raise AdapterError(f"Each stop string must have 1 to {chars} characters; got {len(s)}.", param="stop")
            check_text(s, "stop")
        return stop

    def completion_prompts(self, body: CompletionRequest) -> list[str | list[int]]:
        """The prompts of a completion request (one choice each), each checked by :meth:`check_prompt`."""
        prompts = body.prompts()
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise AdapterError(f"prompt must hold 1 to {MAX_PROMPTS} prompts; got {len(prompts)}.", param="prompt")
        for i, p in enumerate(prompts):
            self.check_prompt(p, "prompt" if len(prompts) == 1 else f"prompt.{i}")
        return prompts

    def check_prompt(self, prompt: str | list[int], param: str = "prompt") -> None:
        """Length in characters (before tokenizing), well-formed text, token ids inside the vocabulary."""
        if isinstance(prompt, str):
            self._check_chars(len(prompt), param)
            check_text(prompt, param)
            return
        if len(prompt) > self.engine.max_prompt_tokens:
            return  # the engine names the token limit
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise AdapterError(
                f"prompt holds token id {bad}, outside the vocabulary [0, {self.vocab_size}).", param=param
            )

    def _check_chars(self, n: int, param: str) -> None:
        if n > self.max_prompt_chars:
            raise AdapterError(
                f"{param} has {n} characters, over the limit of {self.max_prompt_chars} (--max-prompt-chars); "
                "shorten it.",
                param=param,
            )

    def chat_messages(self, body: ChatRequest) -> list[dict[str, str]]:
        """The messages as ``{"role", "content"}`` text dicts (a list of text parts joined; an assistant's ``null``
        content is empty), checked: text parts only, well-formed text, and their size with the least a template adds
        per message against ``max_prompt_chars`` -- before any template runs."""
        messages = []
        for i, m in enumerate(body.messages):
            param = f"messages.{i}.content"
            if m.content is None:
                if m.role != "assistant":
                    raise AdapterError(f"{param} is null; only an assistant message may have no content.", param=param)
                text = ""
            elif isinstance(m.content, str):
                text = m.content
            else:
                bad = next((p for p in m.content if p.type != "text" or p.text is None), None)
                if bad is not None:
                    raise AdapterError(
                        f"{param} holds a part of type {bad.type[:40]!r}; nora serve reads text parts only "
                        '({"type": "text", "text": ...}).',
                        param=param,
                    )
                text = "".join(p.text for p in m.content)  # type: ignore[misc]
            check_text(text, param)
            messages.append({"role": m.role, "content": text})
        least = sum(len(m["content"]) for m in messages) + MIN_CHARS_PER_MESSAGE * len(messages)
        self._check_chars(least, "messages")
        return messages

    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion's prompt, tokenized in a worker thread."""

        def run() -> list[int]:
            with self._tokenize_lock:
                return self.engine.encode(prompt)

        return await run_in_threadpool(run)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat: templated, its text counted against ``max_prompt_chars``, then tokenized -- all in a
        worker thread (a template over many messages takes time too)."""

        def run() -> list[int]:
            with self._tokenize_lock:
                text = format_chat(self.engine.tokenizer, messages)
                self._check_chars(len(text), "messages")
                return self.engine.encode(text, chat=True)

        return await run_in_threadpool(run)
