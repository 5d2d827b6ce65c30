"""Binary ``.npy`` payloads between the gateway and the model service (never pickle, never JSON).

The model service's APIs take one positional ``.npy`` body and answer one ``.npy`` body. They
are declared with the annotated types below, which BentoML sees as binary strings:

* the request body is sent raw (``Content-Type: application/x-npy``) and parsed here with
  ``np.load(allow_pickle=False)``, so adaptive batching receives, concatenates and splits plain
  ``np.ndarray`` objects along axis 0 (the group axis);
* the response is the ``.npy`` bytes of the request's slice of the batch, which BentoML's client
  returns as raw bytes (``{"type": "string", "format": "binary"}``): the gateway decodes them with
  `loads` itself.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from bentoml.validators import ContentType
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

MEDIA_TYPE = "application/x-npy"
_BINARY = {"type": "string", "format": "binary"}


def dumps(arr: np.ndarray) -> bytes:
    """``.npy`` bytes of ``arr`` (any non-object dtype, structured dtypes included)."""
    arr = np.asarray(arr)
    if arr.dtype.hasobject:
        raise TypeError("object arrays cannot be sent as .npy without pickle")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def loads(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Parse ``.npy`` bytes, refusing pickled (object) arrays."""
    try:
        return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"body is not a valid .npy array without pickle ({exc})") from exc


def _float_groups(value: Any) -> np.ndarray:
    """Validator of a request body: a finite float32 4-D array with at least one group."""
    arr = value if isinstance(value, np.ndarray) else loads(value)
    if arr.ndim != 4 or arr.shape[0] < 1 or arr.dtype != np.float32:
        raise ValueError(f"expected a float32 (B, C, H, W) array with B >= 1, got {arr.dtype} {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("array holds NaN or infinite values")
    return arr


def _to_npy(value: Any) -> bytes:
    return value if isinstance(value, (bytes, bytearray)) else dumps(value)


# Request body of the model service: npy bytes in, np.ndarray out (batched along axis 0).
NpyGroups = Annotated[
    Any,
    PlainValidator(_float_groups),
    PlainSerializer(_to_npy, return_type=bytes),
    WithJsonSchema(_BINARY),
    ContentType(MEDIA_TYPE),
]
# Response body: np.ndarray (or ready bytes) in, npy bytes on the wire.
NpyOut = Annotated[
    Any,
    PlainValidator(lambda v: v),
    PlainSerializer(_to_npy, return_type=bytes),
    WithJsonSchema(_BINARY),
    ContentType(MEDIA_TYPE),
]
