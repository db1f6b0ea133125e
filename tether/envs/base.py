"""The environment protocol: what an episode of multi-turn RL talks to.

An episode starts from a dataset row. `reset(row)` gives the opening (a prompt string, or chat messages);
after each model turn, `step(turn)` gets the turn as sampled (its text and token ids) and answers with
`Feedback`: the next observation (messages for the conversation, or none), an optional reward for the turn,
and whether the episode is done. One environment object serves one episode; a factory named in the config
(`module:Class`, `path.py:Class` or a built-in name) builds one per episode. `step` may be a coroutine.

    class Guess:
        def reset(self, row):  return "Guess 1-15:"
        def step(self, turn):  return Feedback(messages=[{"role": "user", "content": "higher"}])

Plain Python: environments are tested without a model (tests/envs/).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Turn:
    """The model's turn as it was sampled."""

    text: str                  # decoded without special tokens
    token_ids: list[int]       # exactly the sampled ids, the end-of-turn token included when there was one
    truncated: bool = False    # ended by the turn's token limit, not by an end-of-turn token
    index: int = 0             # 0 for the first model turn of the episode


@dataclass
class Feedback:
    """The environment's answer to a model turn."""

    messages: list[dict] | None = None   # what the conversation gets next (roles user or tool); None: nothing
    reward: float | None = None          # reward for this turn; it goes to the turn's last token
    done: bool = False
    info: dict = field(default_factory=dict)  # counted per episode: tool_calls, tool_errors (ints)


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: dict) -> str | list[dict]: ...

    def step(self, turn: Turn) -> Feedback: ...


class EpisodeError(RuntimeError):
    """An environment raised or answered with something that is not `Feedback`; names the environment and
    the episode."""


def as_feedback(value: Any, where: str) -> Feedback:
    """`value` as Feedback: Feedback itself, or a (messages, reward, done) tuple; anything else is an error."""
    if isinstance(value, Feedback):
        fb = value
    elif isinstance(value, tuple) and len(value) == 3:
        fb = Feedback(messages=value[0], reward=value[1], done=bool(value[2]))
    else:
        raise EpisodeError(f"{where}: step() returned a {type(value).__name__}; it must return "
                           "tether.envs.Feedback(messages=..., reward=..., done=...)")
    if isinstance(fb.messages, str):
        fb.messages = [{"role": "user", "content": fb.messages}]
    if fb.messages is not None:
        for m in fb.messages:
            if not isinstance(m, dict) or m.get("role") not in ("user", "tool", "system") \
                    or not isinstance(m.get("content"), str):
                raise EpisodeError(f"{where}: an observation message must be {{'role': 'user' or 'tool', "
                                   f"'content': str}}, got {m!r}")
    if fb.reward is not None:
        try:
            fb.reward = float(fb.reward)
        except (TypeError, ValueError):
            raise EpisodeError(f"{where}: step() gave reward {fb.reward!r}, not a number") from None
        if fb.reward != fb.reward or abs(fb.reward) == float("inf"):
            raise EpisodeError(f"{where}: step() gave a non-finite reward {fb.reward}")
    if not fb.done and not fb.messages:
        raise EpisodeError(f"{where}: step() returned no observation and done=False: the episode cannot go on")
    return fb


def run_sync(results: list) -> list:
    """Await the coroutines among `results` (an async environment's `reset`/`step`), concurrently."""
    pending = [i for i, r in enumerate(results) if inspect.isawaitable(r)]
    if not pending:
        return results

    async def gather():
        return await asyncio.gather(*(results[i] for i in pending), return_exceptions=True)

    for i, value in zip(pending, asyncio.run(gather())):
        results[i] = value
    return results
