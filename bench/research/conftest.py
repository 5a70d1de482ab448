"""The research harnesses' own tests (`.venv/bin/python -m pytest bench/research`, not part of the product suite
that CI runs): they share the product suite's fixtures."""

from tests.conftest import *  # noqa: F403 (fixtures: tiny_model_path, tokenizer, real-model artifacts)
