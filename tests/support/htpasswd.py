"""htpasswd files as ``htpasswd -B`` writes them (bcrypt, ``$2y$``), cheap cost for tests."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt


def htpasswd_line(user: str, password: str, cost: int = 4) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return f"{user}:{hashed.replace('$2b$', '$2y$', 1)}"


def write_htpasswd(path: Path, users: dict[str, str]) -> str:
    """Write the file; return its text (the tests look for its hashes in logs)."""
    text = "".join(htpasswd_line(user, password) + "\n" for user, password in users.items())
    path.write_text(text)
    return text


def basic(user: str, password: str) -> dict[str, str]:
    """An ``Authorization`` header with Basic credentials."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
