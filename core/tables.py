"""The one shape every table of variants has (stages, gates, estimators, policy and reward losses, rollout engines,
bias suites): rows with a `name`, kept in the order given, looked up by name (docs/architecture.md, "Tables")."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def table(*rows: T) -> dict[str, T]:
    """`rows` keyed by their `name`, in order; two rows with one name are a bug, refused at import."""
    out: dict[str, Any] = {}
    for row in rows:
        name = row.name  # type: ignore[attr-defined]
        if name in out:
            raise ValueError(f"two rows are named {name!r}")
        out[name] = row
    return out
