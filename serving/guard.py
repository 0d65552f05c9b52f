"""What reaches the service's endpoints, checked before BentoML parses anything.

BentoML alone answers a malformed upload with a 500, fetches a URL that a client puts in a file
field, returns every pydantic error of a huge JSON body, and logs each client error at ERROR
with a traceback. ``RequestGuard`` sits in front: bodies are bounded, image endpoints take
multipart uploads whose fields are known (files under ``images``, the few text options), error
bodies are short, and ``/reload`` needs the operator's token. ``ClientErrorLog`` turns BentoML's
log of a 4xx into one WARNING line.

Once the service has put its ``endpoints`` in the state, the guard hands them the form it has
checked, so each upload is parsed once: BentoML's own parse of the same body (spooling every
file to disk for a ``Path`` argument) and its response machinery cost more per one-image request
than the forward pass. BentoML's middleware around the guard (metrics, tracing, access log,
time-out, concurrency limit) still sees every request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serving import log, uploads

# Per image endpoint, the text fields it takes beside the files under "images".
IMAGE_ROUTES = {"/embed": (), "/classify": ("head",), "/segment": (), "/regress": (), "/attention": ()}
RELOAD_ROUTE = "/reload"
# A whole slide, or a zip of a CT series: streamed to disk by the guard (BentoML would read the
# upload into memory), one file under the field the route names, answered with the id that
# /predict_slide or /predict_series takes.
UPLOAD_ROUTES = {"/upload_slide": "slide", "/upload_series": "series"}
OPENAPI_ROUTE = "/docs.json"
# The API page, at the root (where BentoML puts its own) and at /docs (where people look): ours,
# so that it labels uploads as images and loads nothing from outside the service.
DOCS_PAGES = ("/", "/docs")
DOCS_PAGE = (Path(__file__).parent / "static" / "docs.html").read_bytes()
# An image route's answer from the uploads under "images" and the text options, by route.
Endpoints = Callable[[str, list[BinaryIO], dict[str, str]], Awaitable[BaseModel]]


@dataclass
class ServingState:
    """What the service serves and, when it refused to follow its alias, why: ``/readyz`` says so
    (still ready: the set it serves is unchanged). While the models load, or when they could not
    be, ``/readyz`` and the image endpoints answer 503 with the reason."""

    serving: tuple = ()
    refused: str | None = None
    loading: str | None = None
    failed: str | None = None
    watch: str | None = None  # why what is served is not watched (the backbone has no drift reference)
    endpoints: Endpoints | None = None

    @property
    def unavailable(self) -> str | None:
        return self.failed or self.loading


class RequestGuard:
    def __init__(self, app, max_body_bytes: int, max_images: int, reload_token: str = "", max_error_bytes: int = 2048,
                 state: ServingState | None = None, describe: Callable[[dict], dict] | None = None,
                 max_upload_bytes: int = 0):
        self.app, self.max_body_bytes, self.max_images = app, max_body_bytes, max_images
        self.max_upload_bytes = max_upload_bytes
        self.reload_token, self.max_error_bytes, self.state = reload_token, max_error_bytes, state
        self.describe = describe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._short_errors(send)
        path, method = scope["path"], scope["method"]
        if path == "/readyz" and self.state is not None and self.state.unavailable:
            body = json.dumps({"ready": False, "error": self.state.unavailable})
            return await _send_json(send, 503, body.encode(), [(b"retry-after", b"5")])
        if path == "/readyz" and self.state is not None and self.state.serving:
            said = {"refused": self.state.refused, "watch": self.state.watch}
            body = json.dumps({"ready": True, "serving": list(self.state.serving), **{k: v for k, v in said.items() if v}})
            return await _send_json(send, 200, body.encode())
        if path in DOCS_PAGES and method == "GET":
            return await _send(send, 200, DOCS_PAGE, b"text/html; charset=utf-8")
        if path == OPENAPI_ROUTE and method == "GET" and self.describe is not None:
            return await self.app(scope, receive, self._described(send))
        if path in IMAGE_ROUTES and self.state is not None and self.state.unavailable:
            return await _answer(send, 503, f"{self.state.unavailable}; retry shortly")
        if path == RELOAD_ROUTE and (problem := self._reload_refusal(Headers(scope=scope))):
            return await _answer(send, *problem)
        if method == "POST" and path in UPLOAD_ROUTES:
            return await self._upload(scope, receive, send, UPLOAD_ROUTES[path])
        if method != "POST" or path not in IMAGE_ROUTES:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _answer(send, 413, f"request body of {int(length)} bytes; at most {self.max_body_bytes} "
                                            "(VF_MAX_REQUEST_BYTES)")
        if headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return await _answer(send, 415, "send multipart/form-data with the images as files in the field 'images'")
        body = await self._read(receive)
        if body is None:
            return await _answer(send, 413, f"request body over {self.max_body_bytes} bytes (VF_MAX_REQUEST_BYTES)")
        form, problem = await self._checked_form(scope, body, IMAGE_ROUTES[path])
        try:
            if problem:
                return await _answer(send, 400, problem)
            if self.state is None or self.state.endpoints is None:
                return await self.app(scope, _replay(body), send)
            return await self._respond(send, path, form, self.state.endpoints)
        finally:
            if form is not None:
                await form.close()

    async def _upload(self, scope, receive, send, kind: str) -> None:
        """A slide or series upload: its declared size checked first, its body parsed as it streams
        (the file spooled to disk), the file moved to the upload store and checked before it is
        accepted (``serving.uploads``). Memory stays bounded whatever the upload's size."""
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if not length.isdigit():
            return await _answer(send, 411, f"send the {kind} with a Content-Length header (curl -F and browsers do)")
        if int(length) > self.max_upload_bytes:
            return await _answer(send, 413, f"request body of {int(length)} bytes; at most {self.max_upload_bytes} "
                                            "(VF_MAX_UPLOAD_BYTES)")
        if headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return await _answer(send, 415, f"send multipart/form-data with the {kind} as a file in the field '{kind}'")
        try:
            form = await Request(scope, receive).form(max_files=2, max_fields=1)
        except (MultiPartException, HTTPException) as exc:
            return await _answer(send, 400, f"malformed multipart body: {getattr(exc, 'detail', None) or exc}")
        try:
            parts = list(form.multi_items())
            if len(parts) != 1 or parts[0][0] != kind or not isinstance(parts[0][1], UploadFile):
                return await _answer(send, 400, f"{kind}: send exactly one file, in the field '{kind}'")
            upload = parts[0][1]
            try:
                stored = await asyncio.to_thread(uploads.store, upload.file, upload.filename or "", kind)
            except uploads.UploadRefused as exc:
                return await _answer(send, 400, str(exc))
            await _send_json(send, 200, json.dumps(stored).encode())
        finally:
            await form.close()

    def _reload_refusal(self, headers: Headers) -> tuple[int, str] | None:
        if not self.reload_token:
            return 403, "/reload is off: set VF_RELOAD_TOKEN on the service to enable it (the poll still follows promotions)"
        given = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), self.reload_token.encode()):
            return 401, "/reload needs the header 'Authorization: Bearer <VF_RELOAD_TOKEN>'"
        return None

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (a chunked body has no length)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _checked_form(self, scope, body: bytes, options: tuple[str, ...]) -> tuple[FormData | None, str | None]:
        """The parsed form, and what is wrong with its fields if anything (the caller closes it)."""
        expected = "files under 'images'" + "".join(f", text '{o}'" for o in options)
        try:
            # One file over the limit is let through to be counted below, with the limit named.
            form = await Request(scope, _replay(body)).form(max_files=self.max_images + 1, max_fields=len(options) + 1)
        except (MultiPartException, HTTPException) as exc:
            detail = str(getattr(exc, "detail", None) or getattr(exc, "message", exc))
            if detail.startswith("Too many files"):
                return None, f"images: at most {self.max_images} per request"
            return None, f"malformed multipart body: {detail}"
        images = 0
        for key, value in form.multi_items():
            if key == "images":
                if not isinstance(value, UploadFile):
                    # BentoML would fetch a string here as a URL: the service never fetches what a client names.
                    return form, "images: expected image files, got a text value (URLs are not fetched)"
                images += 1
            elif key in options:
                if isinstance(value, UploadFile):
                    return form, f"{key}: expected a text value, got a file"
            else:
                return form, f"unknown field {key[:64]!r}; expected {expected}"
        if images > self.max_images:
            return form, f"images: at most {self.max_images} per request, got {images}"
        return form, None if images else f"images: send at least one image file (expected {expected})"

    @staticmethod
    async def _respond(send, path: str, form: FormData, endpoints: Endpoints) -> None:
        images = [value.file for key, value in form.multi_items() if key == "images"]
        options = {key: value for key, value in form.multi_items() if key != "images"}
        try:
            answer = await endpoints(path, images, options)
        except Exception as exc:
            # BentoML's errors carry their status (BadInput 400, a too-large image 413).
            status = getattr(getattr(exc, "error_code", None), "value", 500)
            if status < 500:
                return await _answer(send, status, str(exc))
            log.exception("%s failed", path)
            return await _send_json(send, 500, b'{"error": "an unexpected error; the server log says what"}')
        await _send_json(send, 200, answer.model_dump_json().encode())

    def _described(self, send):
        """``/docs.json`` as ``describe`` completes it."""
        parts: list[bytes] = []
        held: dict = {}

        async def described(message):
            if message["type"] == "http.response.start":
                held["start"] = message
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            start = held.pop("start")
            body = b"".join(parts)
            if start["status"] == 200:
                body = json.dumps(self.describe(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return described

    def _short_errors(self, send):
        """Cut an error body over ``max_error_bytes`` to its start: a client's mistake never
        becomes a megabyte of echoed detail."""
        held: dict = {}
        parts: list[bytes] = []

        async def guarded(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"] = message
                return
            if "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(parts)
            if len(body) > self.max_error_bytes:
                text = body[: self.max_error_bytes // 2].decode("utf-8", "replace")
                body = json.dumps({"error": text, "truncated": True}).encode()
            start = held.pop("start")
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return guarded


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_json(send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    await _send(send, status, body, b"application/json", extra_headers)


async def _send(send, status: int, body: bytes, content_type: bytes,
                extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})


async def _answer(send, status: int, error: str) -> None:
    await _send_json(send, status, json.dumps({"error": error}).encode())
    log.warning("refused with %d: %s", status, error)


class ClientErrorLog(logging.Filter):
    """BentoML logs every failed request at ERROR with a traceback; a client's error (4xx, or a
    request that failed validation) becomes one WARNING line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(exc, "error_code", None), "value", None)
        client_error = (isinstance(status, int) and status < 500) or type(exc).__name__ == "ValidationError"
        if client_error:
            record.msg, record.args = "%s -> %s: %.300s", (record.getMessage(), status or 400, exc)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True
