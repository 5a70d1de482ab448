"""A model's gate scores, kept so that a model is not scored twice on the same items.

In a pipeline the SFT model is the parent of every later stage's bias gate: DPO's and PPO's gates score it again on
the very items SFT's own gate scored it on (on the real 135M model, half a minute per scoring, hours on a large one).
Scores are a deterministic function of four things, and the key is a sha256 over all of them:
1. the model's bytes: every file `load_for_eval` reads for it (an artifact's adapter/merged/model folders, the
   adapters its stack.json merges first, and its base model: a local folder, or a hub id's cached snapshot), by
   content; only files above 256 MiB (a base model's weights) are identified by resolved path, size and
   modification time instead, since reading them whole would cost a good part of what the cache saves (a hub
   snapshot's large files resolve to blobs named by their own sha256);
2. the items scored (their JSON);
3. the scoring settings, the precision and device the model is loaded with, and the torch/transformers versions;
4. the source of the code that scores (the modules named by the caller, and core/models.py that loads).
A changed byte in any of them is a new key, scored afresh: a hit is what scoring would compute now.

Entries live in `$ALIGN_CACHE/scores/<gate>-<key>.json` (written atomically); deleting the folder drops them, and
ALIGN_SCORE_CACHE=0 turns the cache off. A model whose files cannot be identified (not found, unreadable) is never
cached.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from core.config import UserError
from core.manifest import atomic_write_json

WHOLE_FILE_LIMIT = (
    256 * 2**20
)  # bytes: larger files are identified by (path, size, mtime), smaller by content
_SKIP = {"gates", "logs", "checkpoints", "eval_cache"}  # artifact folders scoring never reads
_TEXT = {"README.md"}  # model cards: rewritten when later gates land, never read by a loader


def enabled() -> bool:
    return os.environ.get("ALIGN_SCORE_CACHE", "1") != "0"


def scores_dir() -> Path:
    from core.models import cache_dir  # lazy: core.models imports torch

    return cache_dir() / "scores"


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in _TEXT and not _SKIP & set(p.relative_to(folder).parts)
    )


def _hash_files(h, root: Path, files: list[Path]) -> None:
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0".encode())
        if st.st_size > WHOLE_FILE_LIMIT:
            h.update(f"{p.resolve()}\0{st.st_mtime_ns}\0".encode())
            continue
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def model_fingerprint(model_ref: str) -> str:
    """sha256 of what loading `model_ref` reads: an align artifact (its model folders, stacked adapters and base) or
    a base model (alias, path or hub id, resolved as align resolves it)."""
    from core.models import resolve_model_path  # lazy: core.models imports torch

    h = hashlib.sha256()
    ref = Path(model_ref)
    if (ref / "manifest.json").exists():
        manifest = json.loads((ref / "manifest.json").read_text())
        base = (manifest.get("model") or {}).get("name")
        if not base:
            raise ValueError(f"{ref}: the manifest names no model")
        h.update(f"artifact\0base\0{model_fingerprint(base)}\0".encode())
        folders = [ref / name for name in ("adapter", "merged", "model") if (ref / name).is_dir()]
        if (ref / "stack.json").exists():
            stack = json.loads((ref / "stack.json").read_text())
            _hash_files(h, ref, [ref / "stack.json"])
            folders += [(ref / a).resolve() for a in stack.get("merge", [])]
            folders.append(ref / stack.get("adapter", "adapter"))
        if not folders:
            raise ValueError(f"{ref}: no model files to identify")
        for folder in dict.fromkeys(folders):  # in order, once each
            h.update(f"folder\0{folder.name}\0".encode())
            _hash_files(h, folder, _files(folder))
        return h.hexdigest()
    path = resolve_model_path(model_ref)
    if not isinstance(
        path, Path
    ):  # a hub id: the snapshot transformers has cached (its blobs are named by hash)
        try:
            path = Path(snapshot_download(model_ref, local_files_only=True))
        except Exception as e:
            raise ValueError(f"{model_ref}: no local snapshot ({type(e).__name__})") from None
    h.update(b"model\0")
    _hash_files(h, path, _files(path))
    return h.hexdigest()


def score_key(gate: str, model_ref: str, items: Any, settings: dict, code: list[str]) -> str | None:
    """The cache key of one model's scores, or None when the model cannot be identified (then nothing is cached)."""
    import torch
    import transformers

    from core.models import choose_precision, device

    try:
        fingerprint = model_fingerprint(model_ref)
    except (OSError, ValueError, UserError):
        return None
    h = hashlib.sha256()
    sources = [importlib.import_module(m).__file__ for m in (*code, "core.models")]
    for src in sources:
        h.update(Path(src).read_bytes())
    env = {"precision": choose_precision("auto"), "device": str(device()), "torch": torch.__version__,
           "transformers": transformers.__version__}  # fmt: skip
    h.update(json.dumps([gate, fingerprint, items, settings, env], sort_keys=True, default=str).encode())
    return f"{gate}-{h.hexdigest()}"


def cached_scores(
    gate: str, model_ref: str, items: Any, settings: dict, code: list[str], score: Callable[[], dict]
) -> tuple[dict, bool]:
    """(record, hit): the stored record of `model_ref` under this key, else score() (a JSON-able dict), stored."""
    key = score_key(gate, model_ref, items, settings, code) if enabled() else None
    path = scores_dir() / f"{key}.json" if key else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text()), True
        except (OSError, ValueError):
            pass  # unreadable: score afresh and write it again
    record = json.loads(json.dumps(score()))  # a miss returns exactly what a later hit will read
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, record)
        except OSError:
            pass  # a read-only cache only costs the time it would have saved
    return record, False


def score_models(
    gate: str,
    refs: dict[str, str],
    items: Any,
    settings: dict,
    code: list[str],
    score: Callable[[Any, Any], Any],
    allow_pending: bool = False,
) -> tuple[dict[str, Any], dict[str, str], dict[str, bool]]:
    """(scores, descriptions, reused) per role of `refs` ({"parent": ref, "candidate": ref}): each model's stored
    scores, else score(model, tokenizer) (JSON-able) on the model loaded with its adapter merged."""
    from core.models import load_for_eval  # lazy: loads torch/transformers

    scores, descriptions, reused = {}, {}, {}
    for role, ref in refs.items():

        def load_and_score(ref=ref) -> dict:
            model, tok, description = load_for_eval(str(ref), allow_pending=allow_pending, merge=True)
            return {"scores": score(model, tok), "description": description}

        record, reused[role] = cached_scores(gate, str(ref), items, settings, code, load_and_score)
        scores[role], descriptions[role] = record["scores"], record["description"]
    return scores, descriptions, reused
