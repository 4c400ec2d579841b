"""The server's client-facing error: a message safe to show, the HTTP status and the request field it is about."""

from __future__ import annotations


class AdapterError(ValueError):
    """A problem a client caused (a bad field, an adapter it named or asked to load); ``status`` is the HTTP status.

    Messages go to the client as they are: they name the field and the fix, never a server path or internals.
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def timeout_message(seconds: float) -> str:
    """The one wording of ``request_timeout_s`` expiring, whether the scheduler drops a request still queued or the
    server stops waiting for a first token."""
    return f"The request waited over {seconds:g}s for its first token (queued or in prefill); retry later."
