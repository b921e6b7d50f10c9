"""What the OCI distribution spec names, for tests that check the mirror's answers."""

from __future__ import annotations

__all__ = ["DISTRIBUTION_CODES", "SPEC_CODES"]

# The error codes of the spec's table.
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)
# CNCF distribution's own, where the spec's table has nothing for the case.
DISTRIBUTION_CODES = SPEC_CODES | {"RANGE_INVALID", "PAGINATION_NUMBER_INVALID"}
