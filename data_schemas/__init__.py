"""Pydantic models of every input file, config and artifact record (no torch here)."""
