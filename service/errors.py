"""The service's refusals: one JSON body ``{"error": <tag>, "message", "accepted", "status"}`` for every
4xx (and our 503s), mapped from the library's exceptions. 5xx are only for our own bugs."""

from __future__ import annotations

ACCEPTED_BUNDLE = ("multipart/form-data with a field 'file' holding a TrackVis .trk, an MRtrix .tck "
                   "(plus a field 'reference': NIfTI .nii/.nii.gz or .trk giving its space) or a TRX .trx file")
ACCEPTED_LATENTS = ("multipart/form-data with a field 'file' holding a .vqlat latents file written by "
                    "POST /encode (vqdiff-latents, safetensors)")

# BundleFormatError.reason -> HTTP status (400 for the others: malformed)
_BUNDLE_STATUS = {**dict.fromkeys(("wrong_magic", "unsupported_format"), 415),
                  **dict.fromkeys(("too_many_streamlines", "too_many_points", "too_large"), 413),
                  **dict.fromkeys(("non_finite", "too_few_points", "bad_reference", "bad_shape", "zero_length",
                                   "degenerate_bundle", "coordinates_too_large"), 422)}


class ApiError(Exception):
    """A request the service refuses: ``status`` (4xx), ``reason`` tag, message, what is accepted."""

    def __init__(self, status: int, reason: str, message: str, accepted: str | None = None, *,
                 headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.reason, self.message, self.accepted, self.extra = status, reason, message, accepted, extra
        self.headers = dict(headers or {})

    def body(self) -> dict:
        out = {"error": self.reason, "message": self.message, "status": self.status}
        if self.accepted:
            out["accepted"] = self.accepted
        out.update(self.extra)
        return out

    def to_response(self):
        from starlette.responses import JSONResponse

        headers = {"WWW-Authenticate": 'Bearer realm="vqdiff"'} if self.status == 401 else {}
        return JSONResponse(self.body(), status_code=self.status, headers={**headers, **self.headers} or None)


def refusal(exc: Exception) -> ApiError | None:
    """The 4xx of a library exception that a request caused (None: not the caller's doing)."""
    from vqdiff.errors import BundleFormatError, LatentsFormatError, ModelMismatchError

    if isinstance(exc, BundleFormatError):  # 400 (malformed), 413, 415 (not a tractogram) or 422 (invalid)
        return ApiError(_BUNDLE_STATUS.get(exc.reason, 400), exc.reason, str(exc), ACCEPTED_BUNDLE)
    if isinstance(exc, LatentsFormatError):
        return ApiError(400, "bad_latents", str(exc), ACCEPTED_LATENTS)
    if isinstance(exc, ModelMismatchError):
        return ApiError(409, "model_mismatch", str(exc), "latents made by the model this server runs (GET /model)")
    return None
