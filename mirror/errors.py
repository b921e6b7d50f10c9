"""The errors the mirror answers with, as the OCI distribution spec names them.

Every failure that reaches a client is an ``OCIError``; the web layer renders it as
``{"errors": [{"code", "message", "detail"}]}`` with ``status``. Nothing else builds
error JSON.

    OCIError (500 UNKNOWN)
    ├── NameInvalid (400)        ├── Unauthorized (401)
    ├── DigestInvalid (400)      ├── Denied (403)
    ├── ManifestInvalid (400)    ├── Unsupported (405)
    ├── RangeNotSatisfiable(416) ├── TooManyRequests (429)
    ├── BlobUnknown (404)        └── Unavailable (503)
    ├── ManifestUnknown (404)        ├── DigestMismatch
    ├── NameUnknown (404)            └── UpstreamRefused
    ├── PaginationInvalid (400)
    └── QueryInvalid (400)
"""

from __future__ import annotations

import math

__all__ = [
    "BlobUnknown",
    "Denied",
    "DigestInvalid",
    "DigestMismatch",
    "ManifestInvalid",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "OCIError",
    "PaginationInvalid",
    "QueryInvalid",
    "RangeNotSatisfiable",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "Unsupported",
    "UpstreamRefused",
    "retry_after",
]


class OCIError(Exception):
    code = "UNKNOWN"
    status = 500

    def __init__(
        self,
        message: str = "",
        detail: object = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or self.code.lower().replace("_", " "))
        self.message = str(self.args[0])
        self.detail = detail
        # Extra response headers the client needs, e.g. Retry-After on 429.
        self.headers = headers or {}


class NameInvalid(OCIError):
    code, status = "NAME_INVALID", 400


class DigestInvalid(OCIError):
    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(OCIError):
    code, status = "MANIFEST_INVALID", 400


class BlobUnknown(OCIError):
    code, status = "BLOB_UNKNOWN", 404


class ManifestUnknown(OCIError):
    code, status = "MANIFEST_UNKNOWN", 404


class NameUnknown(OCIError):
    code, status = "NAME_UNKNOWN", 404


class Unauthorized(OCIError):
    code, status = "UNAUTHORIZED", 401


class Denied(OCIError):
    code, status = "DENIED", 403


class Unsupported(OCIError):
    code, status = "UNSUPPORTED", 405


class RangeNotSatisfiable(OCIError):
    code, status = "RANGE_INVALID", 416


class TooManyRequests(OCIError):
    code, status = "TOOMANYREQUESTS", 429


class Unavailable(OCIError):
    code, status = "UNAVAILABLE", 503


class PaginationInvalid(OCIError):
    code, status = "PAGINATION_NUMBER_INVALID", 400


class QueryInvalid(OCIError):
    """A query the API has no use for (oversized); the spec's table has no closer code."""

    code, status = "UNSUPPORTED", 400


class DigestMismatch(Unavailable):
    """The upstream sent content that does not hash to its digest; nothing was cached."""


class UpstreamRefused(Unavailable):
    """An upstream exchange that cannot succeed as configured, though the upstream is up.

    The upstream refused the mirror's own credentials, or led somewhere the mirror
    will not follow (a token realm or a redirect target its configuration does not
    allow). Never a 401: the client's credentials are not what failed.
    """


class RequestInvalid(OCIError):
    """An admin request that names nothing sensible (an unknown purge kind, a bad age)."""

    code, status = "INVALID_REQUEST", 400


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))
