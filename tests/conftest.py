"""Shared fixtures. Real data is read from ../shared/data (never copied here); tests that need it skip with
a reason where it is absent. Models come from align's own cache (ALIGN_CACHE or ~/.cache/align)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
EXAMPLES = ROOT / "examples" / "data"


def shared_file(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data file {p} is absent (the shared data folder sits beside the repository)")
    return p


@pytest.fixture(scope="session")
def tokenizer():
    from align.models import load_tokenizer
    from data_schemas.config import ModelConfig

    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from align.models import resolve_model_path

    return Path(resolve_model_path("tiny-random-llama"))


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    from align.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m-instruct"))
