"""Exceptions raised where input enters the library.

Every message names what was wrong *and* what is accepted, so that a CLI or the HTTP service
can show it to the user unchanged.
"""

from __future__ import annotations


class VQDiffError(Exception):
    """Base class of every error this package raises on purpose."""


class BundleFormatError(VQDiffError, ValueError):
    """A tractogram file (or in-memory bundle) is malformed or unsupported.

    ``reason`` is a short machine-readable tag (``"wrong_magic"``, ``"truncated"``, ``"empty"``,
    ``"non_finite"``, ``"too_few_points"``, ``"missing_reference"``, ``"count_mismatch"``,
    ``"unsupported_format"``, ``"unreadable"``, ``"bad_reference"``, ``"bad_shape"``, ``"zero_length"``) that the
    service maps to an HTTP status and that tests assert on.
    """

    def __init__(self, message: str, *, reason: str, path: str | None = None):
        self.reason = reason
        self.path = path
        prefix = f"{path}: " if path else ""
        super().__init__(prefix + message)


class CheckpointError(VQDiffError, ValueError):
    """A checkpoint directory is missing files, has an unknown format version or bad weights."""


class LatentsFormatError(VQDiffError, ValueError):
    """A latents file is not a vqdiff latents file, has an unknown version or is inconsistent."""


class ModelMismatchError(VQDiffError, ValueError):
    """Latents were produced by a different model than the one asked to decode them."""
