"""Helpers shared by the training tests (importable as `helpers`: tests/conftest.py puts this folder on the path)."""

PROMPTS = [{"prompt": c} for c in "abcdefghijklmnop"]


def digit_fraction(prompts, completions, **_):
    """A dense reward a random tiny model can climb: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
