"""`RequestGuard`, the ASGI middleware that checks a request before BentoML parses it: the concurrency limit
(503 + ``Retry-After`` at once), bearer auth (not on the probes and /metrics), and on the file routes
``multipart/form-data`` only (BentoML never fetches a URL), the body under a hard cap (413), the form parsed
(Starlette's parser): real uploads of binary part types, no unknown, duplicated or missing field. The body is
then replayed, the client's file names in ``request.state.upload_names``."""

from __future__ import annotations

import hmac
import re

from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request

from .errors import ACCEPTED_BUNDLE, ACCEPTED_LATENTS, ApiError

UPLOAD_NAMES = "upload_names"
RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
FILE_FIELDS = frozenset({"file", "reference"})
ROUTES = {  # route -> (its form fields, what it accepts)
    "/encode": (frozenset({"file", "reference", "register", "segment", "summary", "embedding"}), ACCEPTED_BUNDLE),
    "/reconstruct": (frozenset({"file", "reference", "register", "segment", "format", "summary"}), ACCEPTED_BUNDLE),
    "/decode": (frozenset({"file", "format", "restore_points", "bundles", "summary"}), ACCEPTED_LATENTS),
    "/score": (frozenset({"file"}), ACCEPTED_LATENTS),
}
PART_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/zip",
                        "application/x-zip-compressed", "application/gzip", "application/x-gzip", "application/x-trk",
                        "application/x-tck", "application/x-trx", "application/x-nifti", "application/vnd.vqdiff.latents"})
_URL = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*://|www\.|//)")
_DRAIN_FACTOR = 4  # read (and drop) up to this many times the limit so the client sees the 413
_TOKEN = "an 'Authorization: Bearer <token>' header with the server's VQDIFF_API_TOKEN"


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


class RequestGuard:
    def __init__(self, app, *, max_upload_bytes: int, api_token: str | None = None, max_in_flight: int | None = None,
                 max_bundles: int = 1):
        self.app, self.max_bytes, self.max_in_flight, self.max_bundles = app, int(max_upload_bytes), max_in_flight, max_bundles
        self.token = api_token.encode() if api_token else None
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        counted = path in ROUTES and scope["method"] == "POST"
        if counted and self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            err = ApiError(503, "overloaded", f"this server is busy ({self.in_flight} requests in flight in this "
                           f"worker, limit {self.max_in_flight}); retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)}, retry_after_s=RETRY_AFTER_S)
            return await err.to_response()(scope, receive, send)
        self.in_flight += counted
        try:
            try:
                headers = Headers(scope=scope)
                if self.token is not None and path not in OPEN_PATHS:
                    self._check_auth(headers)
                if counted:
                    fields, accepted = ROUTES[path]
                    body = await self._read_body(headers, receive, accepted)
                    names = await _check_form(scope, body, fields, accepted, self.max_bundles if "reference" in fields else 1)
                    scope.setdefault("state", {})[UPLOAD_NAMES] = names
                    receive = _replay(body, receive)
            except ApiError as err:
                return await err.to_response()(scope, receive, send)
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= counted

    def _check_auth(self, headers: Headers) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "this server needs a bearer token", _TOKEN)
        if not hmac.compare_digest(token.strip().encode(), self.token):
            raise ApiError(401, "invalid_token", "the bearer token is not valid", _TOKEN)

    async def _read_body(self, headers: Headers, receive, accepted: str) -> bytes:
        ctype = _media_type(headers.get("content-type"))
        if ctype != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", f"request body is {ctype or 'untyped'!s}; files must be "
                           "uploaded as multipart/form-data (URLs, JSON bodies and url-encoded forms are refused: "
                           "this service never fetches a URL)", accepted)
        too_big = ApiError(413, "upload_too_large", f"request body exceeds the limit of {self.max_bytes} bytes",
                           f"uploads of at most {self.max_bytes} bytes ({self.max_bytes / 2**20:.1f} MiB)",
                           limit_bytes=self.max_bytes)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "bad_content_length", f"Content-Length {length!r} is not a number")
            if int(length) > self.max_bytes:
                await _drain(receive, _DRAIN_FACTOR * self.max_bytes)
                raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "client_disconnected", "the client went away before sending the whole body")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, _DRAIN_FACTOR * self.max_bytes - size)
                raise too_big
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _check_form(scope, body: bytes, fields: frozenset, accepted: str, files: int) -> dict:
    """Check the form (up to ``files`` 'file' parts); the names of its files (field -> the file name the client
    sent; 'file' -> the list of them)."""
    try:
        form = await Request(scope, _replay(body, None)).form(max_files=files + 2, max_fields=len(fields))
    except Exception as exc:  # MultiPartException, malformed headers, bad boundary, ...
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({exc})", accepted) from exc
    try:
        names: dict = {"file": []}
        seen = set()
        for key, value in form.multi_items():
            if key not in fields:
                raise ApiError(400, "unknown_field", f"unknown form field {key!r}", f"fields {sorted(fields)}; {accepted}")
            if key in seen and key != "file":
                raise ApiError(400, "duplicate_field", f"form field {key!r} is given twice", accepted)
            if key == "file" and len(names["file"]) == files:
                raise ApiError(413 if files > 1 else 400, "too_many_bundles" if files > 1 else "duplicate_field",
                               f"more than {files} 'file' part(s)", f"at most {files} 'file' part(s); {accepted}")
            seen.add(key)
            if key == "file":
                names[key].append(_check_file_field(key, value, accepted))
            elif key in FILE_FIELDS:
                names[key] = _check_file_field(key, value, accepted)
            elif isinstance(value, UploadFile):
                raise ApiError(400, "unexpected_file", f"form field {key!r} must be a plain value, not a file", accepted)
        if "file" not in seen:
            raise ApiError(400, "missing_file", "the request has no 'file' field", accepted)
        return names
    finally:
        await form.close()


def _check_file_field(key: str, value, accepted: str) -> str:
    if isinstance(value, str):
        if _URL.match(value):
            raise ApiError(400, "url_not_allowed", f"field {key!r} holds a URL ({value[:80]!r}), not a file: this "
                           "service never fetches URLs; upload the file's bytes (e.g. curl -F file=@bundle.trk)", accepted)
        raise ApiError(400, "not_a_file", f"field {key!r} is a text field, not a file upload; send it as a file "
                       "part with a filename (e.g. curl -F file=@bundle.trk)", accepted)
    ctype = _media_type(value.content_type)
    if ctype not in PART_TYPES:
        raise ApiError(415, "unsupported_part_type", f"field {key!r} is sent as {ctype!r}; tractograms and latents "
                       "are binary files", f"part content types {sorted(t for t in PART_TYPES if t)} (or none); {accepted}")
    return value.filename or ""


def _replay(body: bytes | None, receive):
    async def replay():  # lets go of the body once handed over: a finished request's objects may outlive it
        nonlocal body
        if body is not None:
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message
        return {"type": "http.disconnect"} if receive is None else await receive()

    return replay


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a refused body (up to ``budget`` bytes) so the client gets the answer."""
    while budget > 0:
        message = await receive()
        budget -= len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
