"""Environments by name: a built-in one, `module:Class` or `path.py:Class`, as a factory of one per episode."""

from __future__ import annotations

from typing import Callable

from tether.envs.base import Environment
from tether.envs.builtin import ENVIRONMENTS
from tether.rewards.functions import _load_module


def load_environment_factory(spec: str, kwargs: dict | None = None) -> Callable[[], Environment]:
    """A zero-argument factory of environments for `spec`: a built-in name (`tether.envs.ENVIRONMENTS`),
    `module:Class` or `path.py:Class`; `kwargs` are passed to every construction."""
    kwargs = dict(kwargs or {})
    if spec in ENVIRONMENTS:
        cls = ENVIRONMENTS[spec]
    elif ":" in spec:
        target, _, attr = spec.rpartition(":")
        module = _load_module(target, spec)
        if not hasattr(module, attr):
            raise ValueError(f"environment {spec!r}: {target!r} has no attribute {attr!r}")
        cls = getattr(module, attr)
    else:
        raise ValueError(f"unknown environment {spec!r}: give a built-in name ({', '.join(sorted(ENVIRONMENTS))}), "
                         "'module:Class' or 'path/to/file.py:Class'")
    if not callable(cls):
        raise ValueError(f"environment {spec!r} is a {type(cls).__name__}, not a class or factory")
    try:
        probe = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"environment {spec!r}: constructing it with {kwargs} failed: {e}") from e
    missing = [m for m in ("reset", "step") if not callable(getattr(probe, m, None))]
    if missing:
        raise ValueError(f"environment {spec!r} has no {' or '.join(missing)} method")
    return lambda: cls(**kwargs)
