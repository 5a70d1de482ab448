"""Recorded sign-off: a reviewer's decision on a run (or one gate), bound to the exact evidence they saw.

`align gate sign TARGET --reviewer NAME --decision approve|reject|conditions --note TEXT [--key SSH_KEY]` appends
one record to `TARGET/signoffs.jsonl`: who, when, the decision and note, and the sha256 of every piece of evidence
under TARGET: each artifact's manifest.json and model files (adapter/, model/, merged/, value_head/), and each gate
record (gate.json). With `--key`, the record is signed by `ssh-keygen -Y sign` (namespace `align-signoff`) with the
reviewer's SSH key; the signature and the public key travel in the record.

`align gate verify TARGET` hashes the evidence again and checks each sign-off: which files changed, went missing or
appeared since it was given, and whether its signature holds (`ssh-keygen -Y check-novalidate`, or `-Y verify`
against `--allowed-signers` to also tie the key to the reviewer's name). The run report shows every sign-off and
whether its evidence changed. Nothing here is a secret: the hashes make any edit visible, the signature makes the
record itself unforgeable by anyone without the reviewer's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import UserError
from core.manifest import now, sha256_path
from core.stage import MODEL_FOLDERS

SIGNOFFS = "signoffs.jsonl"
DECISIONS = ("approve", "reject", "conditions")
NAMESPACE = "align-signoff"


def evidence(target: Path) -> dict[str, str]:
    """{relative path: sha256} of every piece of evidence under a run or gate folder."""
    target = Path(target)
    files: list[Path] = []
    for manifest in sorted(target.rglob("manifest.json")):
        if ".superseded" in manifest.parts or "checkpoints" in manifest.parts:
            continue
        files.append(manifest)
        for folder in MODEL_FOLDERS:
            files += sorted(
                p for p in (manifest.parent / folder).glob("*") if p.is_file() and p.name != "README.md"
            )
    files += sorted(p for p in target.rglob("gate.json") if ".superseded" not in p.parts)
    return {str(p.relative_to(target)): sha256_path(p) for p in dict.fromkeys(files)}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _body(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "signature"}


def sign(
    target: Path, reviewer: str, decision: str, note: str = "", key: Path | None = None
) -> dict[str, Any]:
    """Append a sign-off to TARGET/signoffs.jsonl and return it."""
    target = Path(target)
    if not (target / "pipeline.json").exists() and not (target / "gate.json").exists():
        raise UserError(f"{target}: neither a run folder (pipeline.json) nor a gate folder (gate.json)")
    if decision not in DECISIONS:
        raise UserError(f"--decision {decision}: choose {', '.join(DECISIONS)}")
    if not reviewer.strip():
        raise UserError("--reviewer: name the person signing")
    if decision == "conditions" and not note.strip():
        raise UserError("--decision conditions: say the conditions with --note")
    seen = evidence(target)
    if not seen:
        raise UserError(f"{target}: holds no evidence to sign (no manifest.json or gate.json)")
    record: dict[str, Any] = {
        "reviewer": reviewer.strip(),
        "decision": decision,
        "note": note.strip(),
        "at": now(),
        "target": str(target),
        "evidence": seen,
        "evidence_sha256": hashlib.sha256(_canonical(seen)).hexdigest(),
    }
    if key is not None:
        record["signature"] = _ssh_sign(_canonical(_body(record)), Path(key))
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(target / SIGNOFFS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def _ssh_keygen() -> str:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise UserError("signing with --key needs OpenSSH's ssh-keygen (8.1 or newer) on PATH")
    return exe


def _ssh_sign(message: bytes, key: Path) -> dict[str, str]:
    if not key.is_file():
        raise UserError(f"--key {key}: no such private key file")
    pub = Path(f"{key}.pub")
    if not pub.is_file():
        raise UserError(f"--key {key}: its public key {pub} is missing (ssh-keygen -y -f {key} > {pub})")
    with tempfile.TemporaryDirectory() as tmp:
        msg = Path(tmp) / "signoff.json"
        msg.write_bytes(message)
        r = subprocess.run([_ssh_keygen(), "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(msg)],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
        if r.returncode != 0:
            raise UserError(f"ssh-keygen -Y sign failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"method": "ssh", "namespace": NAMESPACE, "public_key": pub.read_text().strip(),
                "signature": Path(f"{msg}.sig").read_text()}  # fmt: skip


def _ssh_verify(message: bytes, sig: dict[str, str], reviewer: str, allowed: Path | None) -> str | None:
    """None when the signature holds, else why not. Without `allowed` (an allowed_signers file naming reviewers'
    keys), the signature is checked against the public key recorded with it: the record is as its signer wrote it;
    whether that key is the reviewer's is what `--allowed-signers` answers."""
    with tempfile.TemporaryDirectory() as tmp:
        sig_file = Path(tmp) / "sig"
        sig_file.write_text(sig.get("signature", ""))
        principal = reviewer
        if allowed is None:
            allowed, principal = Path(tmp) / "allowed_signers", "recorded-key"
            allowed.write_text(f'{principal} namespaces="{NAMESPACE}" {sig.get("public_key", "")}\n')
        cmd = [_ssh_keygen(), "-Y", "verify", "-f", str(allowed), "-I", principal, "-n", NAMESPACE,
               "-s", str(sig_file)]  # fmt: skip
        r = subprocess.run(cmd, input=message, capture_output=True)
        if r.returncode != 0:
            return (r.stderr.decode(errors="replace").strip().splitlines() or ["signature does not verify"])[
                -1
            ]
    return None


@dataclass
class Verdict:
    """One sign-off, checked against the evidence as it is now."""

    record: dict[str, Any]
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    signature: str = "unsigned"  # "valid", "unsigned" or why it fails

    @property
    def intact(self) -> bool:
        return not (self.changed or self.missing or self.added) and self.signature in ("valid", "unsigned")

    def summary(self) -> str:
        parts = [f"changed: {', '.join(self.changed)}"] if self.changed else []
        parts += [f"missing: {', '.join(self.missing)}"] if self.missing else []
        parts += [f"new since: {', '.join(self.added)}"] if self.added else []
        parts += [f"signature: {self.signature}"] if self.signature not in ("valid", "unsigned") else []
        return "; ".join(parts) or "evidence unchanged"


def read_signoffs(target: Path) -> list[dict[str, Any]]:
    path = Path(target) / SIGNOFFS
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"reviewer": "?", "decision": "?", "at": "?", "evidence": {},
                            "broken": f"{path}:{i} is not a whole record"})  # fmt: skip
    return out


def verify(target: Path, allowed_signers: Path | None = None) -> list[Verdict]:
    """Every sign-off of TARGET, checked against the evidence now (and its signature, where it has one)."""
    records = read_signoffs(target)
    if not records:  # nothing to check: the evidence (every model file's bytes) is not hashed for nothing
        return []
    now_seen = evidence(Path(target))
    out = []
    for rec in records:
        seen = rec.get("evidence") or {}
        v = Verdict(rec)
        v.changed = sorted(p for p in seen if p in now_seen and now_seen[p] != seen[p])
        v.missing = sorted(p for p in seen if p not in now_seen)
        v.added = sorted(p for p in now_seen if p not in seen)
        if rec.get("broken"):
            v.signature = rec["broken"]
        elif hashlib.sha256(_canonical(seen)).hexdigest() != rec.get("evidence_sha256"):
            v.signature = "the record's evidence list was edited"
        elif rec.get("signature"):
            why = _ssh_verify(
                _canonical(_body(rec)), rec["signature"], rec.get("reviewer", ""), allowed_signers
            )
            v.signature = "valid" if why is None else f"does not verify ({why})"
        out.append(v)
    return out
