"""Upload size limits: the body-limit middleware and the per-file limit.

``FS_MAX_UPLOAD_MB`` bounds one uploaded file; the whole request body may be
:data:`MULTIPART_OVERHEAD` larger (the multipart framing and the small form
fields around the file).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from featurestore.config import Settings
from featurestore.http.errors import error_response

MULTIPART_OVERHEAD = 64 * 1024


def max_upload_bytes(settings: Settings) -> int:
    """Largest uploaded file, in bytes."""
    return max(0, int(settings.max_upload_mb)) * 2**20


def max_body_bytes(settings: Settings) -> int:
    """Largest request body (:class:`BodyLimit`'s ``limit``)."""
    return max_upload_bytes(settings) + MULTIPART_OVERHEAD


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes while they are received.

    A declared ``Content-Length`` over the limit is answered with 413 before any
    byte is read; otherwise bytes are counted as they arrive and the request
    fails with 413 as soon as the count passes the limit, so nothing unbounded
    is buffered or spooled to disk.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _message(self) -> str:
        return (f"request body larger than the upload limit of {self.limit - MULTIPART_OVERHEAD:,} bytes "
                "(FS_MAX_UPLOAD_MB on the server)")

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value) > self.limit
                except ValueError:
                    return False
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared_too_large(scope):
            await error_response(413, self._message())(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # An HTTPException: FastAPI re-raises it from form parsing (other errors become 400).
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)
