"""The credentials of the internal route replicas stream blobs by: an HMAC of the digest
and a near expiry under the shared secret, nothing else."""

from __future__ import annotations

import pytest

from mirror.reference import Digest
from mirror.replicas.peers import peer_authorization, verify_peer

SECRET = "s" * 40
DIGEST = Digest("sha256", "a" * 64)
NOW = 1_000_000.0


def test_a_signed_request_is_accepted_until_it_expires() -> None:
    header = peer_authorization(SECRET, DIGEST, NOW)
    assert verify_peer(SECRET, DIGEST, header, NOW)
    assert verify_peer(SECRET, DIGEST, header, NOW + 29)
    assert not verify_peer(SECRET, DIGEST, header, NOW + 31)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer x",
        "Mirror-Peer",
        "Mirror-Peer 1000030",
        "Mirror-Peer 1000030." + "0" * 64,
        "Mirror-Peer -5.abc",
        "Mirror-Peer 99999999999999999999." + "0" * 64,
    ],
)
def test_anything_but_a_valid_signature_is_refused(header: str | None) -> None:
    assert not verify_peer(SECRET, DIGEST, header, NOW)


def test_a_signature_holds_for_its_digest_and_secret_only() -> None:
    header = peer_authorization(SECRET, DIGEST, NOW)
    assert not verify_peer(SECRET, Digest("sha256", "b" * 64), header, NOW)
    assert not verify_peer("t" * 40, DIGEST, header, NOW)


def test_an_expiry_moved_later_breaks_the_signature() -> None:
    header = peer_authorization(SECRET, DIGEST, NOW)
    expires, _, mac = header.partition(" ")[2].partition(".")
    forged = f"Mirror-Peer {int(expires) + 10}.{mac}"
    assert not verify_peer(SECRET, DIGEST, forged, NOW)


def test_an_expiry_far_ahead_is_refused_even_when_signed() -> None:
    header = peer_authorization(SECRET, DIGEST, NOW + 3600)
    assert not verify_peer(SECRET, DIGEST, header, NOW)
