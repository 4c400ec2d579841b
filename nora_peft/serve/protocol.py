"""What goes over the wire: OpenAI's request bodies (strict types), its response objects and its error shape."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("nora_peft.serve")

MAX_TOKENS_LIMIT = 4096
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 0.01  # below this (but above 0) logits / T overflow: 0 means greedy
MAX_PROMPTS = 64  # prompts in one completion request (a list of strings: one choice each)
#: OpenAI options nora serve does not implement: refused with a 400 when set to anything but their default.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "best_of",
    "echo",
    "suffix",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "audio",
    "modalities",
    "prediction",
)


# -- request bodies ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: `max_tokens: true` or `stream: "yes"` is a 400, not a silent 1 / True (OpenAI's schema types)
    model_config = ConfigDict(strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields are ignored, UNSUPPORTED ones refused

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says (benchmarks)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk carrying ``usage`` (``stream_options.include_usage``)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    #: one text, several texts (one choice each, in order), token ids, or several lists of token ids
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ContentPart(_Strict):
    """A part of a message's ``content`` list; nora serve reads ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # e.g. "name", "tool_call_id"
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)


class LoadAdapterRequest(_Strict):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Strict):
    lora_name: str


# -- errors -----------------------------------------------------------------------------------------------------
class SafeJSON(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent can never break the encoding of an answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
# OpenAI's `code` is a string naming the case, or null; never the HTTP status
_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 503: "server_busy"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": _CODES.get(status)}}


def error_response(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    """OpenAI's error shape as a response; a 503 carries ``Retry-After``."""
    headers = {"Retry-After": str(retry_after)} if status == 503 and retry_after else None
    return SafeJSON(status_code=status, content=error_body(status, message, param), headers=headers)


def safe_message(status: int, message: str) -> str:
    """What a client may read of an engine error: server-side failures are logged, not shown."""
    if status >= 500 and status != 503:
        log.error("request failed: %s", message)
        return "Internal error while generating; the server logged the details."
    return message


# -- responses --------------------------------------------------------------------------------------------------
class Reply:
    """The OpenAI response objects for one request of ``n_choices`` choices (full, or streamed chunks)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, done: list[dict]) -> dict:
        """The whole response from each choice's ``done`` payload (in choice order)."""
        choices = []
        for i, d in enumerate(done):
            choice: dict[str, Any] = {"index": i, "finish_reason": d["finish_reason"], "logprobs": None}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": d["text"]}
            else:
                choice["text"] = d["text"]
            choices.append(choice)
        return self._head(chunk=False) | {"choices": choices, "usage": usage(done)}

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        """One SSE event of choice ``index``."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return sse(self._head(chunk=True) | {"choices": [choice]})

    def usage_chunk(self, done: list[dict]) -> str:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return sse(self._head(chunk=True) | {"choices": [], "usage": usage(done)})


def usage(done: list[dict]) -> dict[str, int]:
    """OpenAI's ``usage``, summed over the choices."""
    prompt = sum(d["prompt_tokens"] for d in done)
    completion = sum(d["completion_tokens"] for d in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"
