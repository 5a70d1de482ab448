"""Annotators and their tokens: a token is printed once and stored as its SHA-256; requests are checked in
constant time."""

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from align.annotate.folder import NAME
from core.config import UserError
from core.manifest import atomic_write_json, now


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_annotator(d: Path, name: str, organiser: bool = False, replace: bool = False) -> str:
    """Issue a token for `name` and store only its SHA-256 (a 192-bit random token needs no salt). Returns the
    token, which is shown once."""
    if not NAME.match(name):
        raise UserError(
            f"annotator name {name[:70]!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "annotators.json"
    people = _read_annotators(path)
    if name in people and not replace:
        raise UserError(
            f"{path}: {name} already has a token; add --replace to issue a new one (the old one stops working)"
        )
    token = secrets.token_urlsafe(24)
    people[name] = {
        "role": "organiser" if organiser else "annotator",
        "token_sha256": _token_hash(token),
        "created_at": now(),
    }
    atomic_write_json(path, {"annotators": people})
    return token


def _read_annotators(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data["annotators"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an annotators file ({e}); re-issue the tokens") from None


class Tokens:
    """Who a bearer token belongs to. Re-reads annotators.json when it changes, so `add-annotator` works while the
    server runs. Comparison in constant time."""

    def __init__(self, path: Path):
        self.path, self.mtime, self.people = Path(path), None, {}

    def who(self, token: str | None) -> tuple[str, str] | None:
        if not token:
            return None
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return None
        if mtime != self.mtime:
            self.people, self.mtime = _read_annotators(self.path), mtime
        digest = _token_hash(token)
        for name, p in self.people.items():
            if hmac.compare_digest(digest, str(p.get("token_sha256", ""))):
                return name, p.get("role", "annotator")
        return None
