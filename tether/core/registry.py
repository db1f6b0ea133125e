"""Name -> callable registries are plain dicts; this is the one lookup helper they share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def get_from_registry(registry: Mapping[str, T], name: str, what: str) -> T:
    """`registry[name]`, or a ValueError naming `what` and listing every known name."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(repr(k) for k in sorted(registry))
        raise ValueError(f"unknown {what} {name!r}; known: {known}") from None


def check_choice(name: str, choices: Mapping[str, object] | tuple[str, ...], what: str) -> str:
    """Validate a string option against a tuple/dict of allowed names (same message as above)."""
    if name not in choices:
        known = ", ".join(repr(k) for k in sorted(choices))
        raise ValueError(f"unknown {what} {name!r}; known: {known}")
    return name
