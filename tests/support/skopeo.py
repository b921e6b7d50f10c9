"""Running skopeo (1.9) against local registries, isolated from the machine's configuration.

Every call passes ``--insecure-policy`` (no dependency on /etc/containers/policy.json), an empty
``registries.conf`` (no mirrors, no short-name aliases: nothing can be redirected elsewhere) and
an empty auth file unless credentials are given (no ``~/.docker/config.json`` leaking in).
``--*-tls-verify=false`` makes skopeo try HTTPS first and fall back to plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "DirVerificationError",
    "SkopeoError",
    "copy",
    "copy_to_dir",
    "dir_blobs",
    "inspect_raw",
    "run_skopeo",
    "sha256_file",
    "verify_dir",
]

SKOPEO = "skopeo"
DEFAULT_TIMEOUT = 300.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INSTANCE_MANIFEST = re.compile(r"^([0-9a-f]{64})\.manifest\.json$")


class SkopeoError(RuntimeError):
    """skopeo failed or timed out; carries the command line and its output."""

    def __init__(self, message: str, argv: Sequence[str], returncode: int | None, stderr: str):
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class DirVerificationError(AssertionError):
    """A ``dir:`` copy is inconsistent (blob content not matching its name, missing blobs)."""


@contextmanager
def _isolation() -> Iterator[tuple[str, str]]:
    """(registries.conf path, auth file path), both empty, for the duration of one call."""
    with tempfile.TemporaryDirectory(prefix="skopeo-iso-") as tmp:
        conf = Path(tmp) / "registries.conf"
        conf.write_text("")
        auth = Path(tmp) / "auth.json"
        auth.write_text("{}")
        yield str(conf), str(auth)


def run_skopeo(
    args: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, registries_conf: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``skopeo --insecure-policy [--registries-conf F] ARGS``; raise SkopeoError on failure."""
    argv = [SKOPEO, "--insecure-policy"]
    if registries_conf is not None:
        argv += ["--registries-conf", registries_conf]
    argv += list(args)
    try:
        result = subprocess.run(
            argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stderr = (exc.stderr or b"").decode(errors="replace")
        raise SkopeoError(
            f"skopeo timed out after {timeout}s: {' '.join(argv)}\n{stderr[-4000:]}",
            argv,
            None,
            stderr,
        ) from exc
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        raise SkopeoError(
            f"skopeo exited with {result.returncode}: {' '.join(argv)}\n{stderr[-4000:]}",
            argv,
            result.returncode,
            stderr,
        )
    return result


def _tls(flag: str, verify: bool) -> str:
    return f"--{flag}={'true' if verify else 'false'}"


def copy(
    src: str,
    dest: str,
    *,
    src_tls_verify: bool = False,
    dest_tls_verify: bool = False,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    all_platforms: bool = False,
    fmt: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """``skopeo copy SRC DEST``; returns the manifest digest skopeo wrote (``--digestfile``).

    ``src_creds``/``dest_creds`` are ``"user:password"``; without them the side is anonymous.
    ``fmt`` is ``oci``, ``v2s2`` or ``v2s1`` (``--format``); ``all_platforms`` is ``--all``.
    """
    with _isolation() as (conf, authfile), tempfile.TemporaryDirectory() as tmp:
        digestfile = Path(tmp) / "digest"
        args = ["copy", "--retry-times", "0", "--digestfile", str(digestfile)]
        if src.startswith("docker://"):
            args.append(_tls("src-tls-verify", src_tls_verify))
            args += ["--src-creds", src_creds] if src_creds else ["--src-authfile", authfile]
        if dest.startswith("docker://"):
            args.append(_tls("dest-tls-verify", dest_tls_verify))
            args += ["--dest-creds", dest_creds] if dest_creds else ["--dest-authfile", authfile]
        if all_platforms:
            args.append("--all")
        if fmt is not None:
            args += ["--format", fmt]
        args += [*extra, src, dest]
        run_skopeo(args, timeout=timeout, registries_conf=conf)
        return digestfile.read_text().strip()


def copy_to_dir(
    src_ref: str,
    out_dir: str | Path,
    *,
    tls_verify: bool = False,
    all_platforms: bool = False,
    creds: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Copy ``src_ref`` (e.g. ``docker://127.0.0.1:PORT/library/x:1``) into ``dir:OUT_DIR``.

    Verifies the result with :func:`verify_dir` and returns the digest of ``manifest.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy(
        src_ref,
        f"dir:{out}",
        src_tls_verify=tls_verify,
        src_creds=creds,
        all_platforms=all_platforms,
        extra=extra,
        timeout=timeout,
    )
    return verify_dir(out)


def inspect_raw(
    ref: str,
    *,
    tls_verify: bool = False,
    creds: str | None = None,
    timeout: float = 60,
) -> bytes:
    """``skopeo inspect --raw REF``: the manifest bytes exactly as served."""
    with _isolation() as (conf, authfile):
        args = ["inspect", "--raw", "--retry-times", "0"]
        if ref.startswith("docker://"):
            args.append(_tls("tls-verify", tls_verify))
            args += ["--creds", creds] if creds else ["--authfile", authfile]
        args.append(ref)
        return run_skopeo(args, timeout=timeout, registries_conf=conf).stdout


def sha256_file(path: str | Path) -> str:
    """``sha256:…`` of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def dir_blobs(out_dir: str | Path) -> dict[str, int]:
    """Blobs of a ``dir:`` copy: ``{"sha256:…": size}`` (file names are the hex digests)."""
    return {
        "sha256:" + p.name: p.stat().st_size
        for p in Path(out_dir).iterdir()
        if _HEX64.match(p.name)
    }


def _descriptor_digests(items: object) -> list[str]:
    if not isinstance(items, list):
        return []
    return [d["digest"] for d in items if isinstance(d, dict) and isinstance(d.get("digest"), str)]


def _referenced(manifest: dict[str, object]) -> tuple[list[str], list[str]]:
    """(blob digests, child manifest digests) a manifest or index refers to."""
    blobs = _descriptor_digests([manifest.get("config")]) + _descriptor_digests(
        manifest.get("layers")
    )
    return blobs, _descriptor_digests(manifest.get("manifests"))


def verify_dir(out_dir: str | Path, *, require_children: bool = False) -> str:
    """Check a ``dir:`` copy and return the digest (``sha256:…``) of its ``manifest.json``.

    Every blob file's sha256 must equal its name, every ``<hex>.manifest.json`` (per-platform
    manifests written by ``--all``) must hash to its name, and every blob referenced by a
    manifest present in the directory must exist.  With ``require_children``, every manifest an
    index lists must be present too (a ``--all`` copy).
    """
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise DirVerificationError(f"{out}: no manifest.json")
    present_blobs: set[str] = set()
    manifests: dict[str, Path] = {}
    for path in out.iterdir():
        if _HEX64.match(path.name):
            actual = sha256_file(path)
            if actual != "sha256:" + path.name:
                raise DirVerificationError(f"{path}: content hashes to {actual}")
            present_blobs.add(actual)
        elif match := _INSTANCE_MANIFEST.match(path.name):
            actual = sha256_file(path)
            if actual != "sha256:" + match.group(1):
                raise DirVerificationError(f"{path}: content hashes to {actual}")
            manifests[actual] = path
    top_digest = sha256_file(manifest_path)
    to_check: list[tuple[str, Path]] = [(top_digest, manifest_path), *manifests.items()]
    for digest, path in to_check:
        manifest = json.loads(path.read_bytes())
        blobs, children = _referenced(manifest)
        missing = [b for b in blobs if b not in present_blobs]
        if missing:
            raise DirVerificationError(f"{out}: manifest {digest} refers to missing {missing}")
        if require_children:
            absent = [c for c in children if c not in manifests and c != top_digest]
            if absent:
                raise DirVerificationError(f"{out}: index {digest} lists absent {absent}")
    return top_digest
