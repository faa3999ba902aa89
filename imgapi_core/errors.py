"""The one client-error type: a status and a message, raised by validation, uploads and routes,
and rendered by the app's one error handler in the one JSON error shape."""

from __future__ import annotations


class ClientError(Exception):
    """A 4xx answer: .status (400, 401, 403, 404, 408, 413, 415, 422, 429, 507 ...) and .message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[ClientError], tuple[int, str]]:
        # arq pickles job exceptions; the default reduce would call ClientError(message) and fail.
        return (type(self), (self.status, self.message))
