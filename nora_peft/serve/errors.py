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
