"""Episode rollouts: multi-turn conversations with an environment, token in and token out.

An episode's token sequence is the opening prompt, then each model turn exactly as sampled, then each
environment turn tokenized once (`EpisodeFormat.env_tokens`: the chat template's delta for those messages),
and so on. The model's own tokens are never decoded and encoded again, so the trainer scores exactly the
tokens the sampler drew. The loss mask is 1 on model tokens only: environment and tool tokens get no loss,
no KL, no entropy and no share of length normalisation. That is exact by construction, the leak peers fixed
after the fact (verl #4412, slime #1370, Search-R1 PR #20).

All live episodes of a step sample each turn together in one batch; finished ones drop out. An episode ends
when the environment says done, after `max_turns` model turns, or when its token budget (`max_tokens` after
the opening, and the context window) cannot hold what comes next: then it is flagged, never cut mid-turn
silently (a model turn cut by the budget is flagged truncated).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from tether.envs.base import EpisodeError, Feedback, Turn, as_feedback, run_sync
from tether.envs.tools import tools_system_text
from tether.rollout.batch import Rollout
from tether.rollout.prompts import messages as prompt_messages

log = logging.getLogger("tether")

# Per-episode counters, the columns of Rollout.episode_BK.
EPISODE_COLUMNS = ("turns", "tool_calls", "tool_errors", "truncated_outputs", "env_tokens", "turn_limit",
                   "token_limit", "env_failed")

_PLACEHOLDER = "\u2063tether-turn\u2063"


# ---------------------------------------------------------------------------------------------------------
# formats: how the opening and the environment's messages become tokens


class ChatFormat:
    """Through the tokenizer's chat template. The environment's turn is the template's delta: the text that
    rendering [..., assistant, *messages] with the generation prompt adds after rendering [..., assistant],
    worked out once on a placeholder turn, so the model's sampled tokens are never re-rendered. Tool schemas
    go to the template as `tools=` where it supports them, else into the system message as plain text."""

    def __init__(self, tokenizer, *, system_prompt: str | None = None, tools: list[dict] | None = None):
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError("model.chat_template=true but the tokenizer has no chat template")
        self.tools = tools or None
        self.template_tools = bool(self.tools) and "tools" in template
        self.system_prompt = system_prompt
        if self.tools and not self.template_tools:
            text = tools_system_text(self.tools)
            self.system_prompt = f"{system_prompt}\n\n{text}" if system_prompt else text
        eos = tokenizer.eos_token
        self._convo = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _PLACEHOLDER}]
        self._before = self._render(self._convo, generation_prompt=False)
        self._close = self._before[self._before.index(_PLACEHOLDER) + len(_PLACEHOLDER):]  # e.g. "<|im_end|>\n"
        self._after_eos = self._close[len(eos):] if eos and self._close.startswith(eos) else None

    def _render(self, msgs: list[dict], *, generation_prompt: bool) -> str:
        kw = {"tools": self.tools} if self.template_tools else {}
        msgs = prompt_messages(msgs, self.system_prompt)
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kw)

    def opening_messages(self, opening) -> list[dict]:
        return prompt_messages(opening, self.system_prompt)

    def opening(self, opening) -> list[int]:
        msgs = [{"role": "user", "content": opening}] if isinstance(opening, str) else opening
        return self.tokenizer(self._render(msgs, generation_prompt=True), add_special_tokens=False).input_ids

    def env_tokens(self, messages: list[dict], *, turn_ended: bool) -> list[int]:
        before = self._before
        after = self._render(self._convo + [dict(m) for m in messages], generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template renders an earlier turn differently once more messages follow; "
                             "its environment turns cannot be tokenized as deltas")
        # The template's close of the model's turn: the rest of it when the model ended with EOS, all of it
        # when the turn was cut (or ended with a stop string).
        close = self._after_eos if (turn_ended and self._after_eos is not None) else self._close
        return self.tokenizer(close + after[len(before):], add_special_tokens=False).input_ids


class PlainFormat:
    """Without a chat template: the opening is the prompt with the tokenizer's special tokens; each
    environment message is its content and a newline (tool results as <tool_response>...</tool_response>); a
    model turn that did not end with EOS gets one, as an environment token, before them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def opening_messages(self, opening) -> list[dict]:
        return prompt_messages(opening)

    def opening(self, opening) -> list[int]:
        if not isinstance(opening, str):
            raise ValueError("a conversational opening needs model.chat_template=true")
        return self.tokenizer(opening).input_ids

    def env_tokens(self, messages: list[dict], *, turn_ended: bool) -> list[int]:
        text = "".join(f"<tool_response>{m['content']}</tool_response>\n" if m["role"] == "tool"
                       else f"{m['content']}\n" for m in messages)
        close = [] if turn_ended else [self.tokenizer.eos_token_id]
        return close + self.tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------------------
# the turn loop


@dataclass
class Sampled:
    """One continuation from a sampler: its tokens (up to and including the end-of-turn token), their
    log-probs, and whether it ended with an end-of-turn token or stop string."""

    token_ids: list[int]
    logprobs: list[float]
    ended: bool


# sample(sequences, max_new_tokens) -> one Sampled per sequence
SampleFn = Callable[[list[list[int]], int], list[Sampled]]


@dataclass
class Episode:
    row: dict
    env: object
    index: int
    opening: object = None
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)          # everything after the opening
    model_mask: list[int] = field(default_factory=list)   # 1 on model tokens
    logprobs: list[float] = field(default_factory=list)   # sampler log-probs, 0 on environment tokens
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (position in ids, reward) per turn
    conversation: list[dict] = field(default_factory=list)
    last_text: str = ""
    counts: dict = field(default_factory=lambda: dict.fromkeys(EPISODE_COLUMNS, 0))
    done: bool = False
    failed: bool = False


class EpisodeRunner:
    """Runs one batch of episodes against environments built by `make_env`."""

    def __init__(self, make_env: Callable[[], object], fmt, tokenizer, *, max_turns: int, max_tokens: int,
                 max_new_tokens: int, context_window: int | None = None, on_error: str = "raise",
                 env_name: str = "environment"):
        self.make_env, self.fmt, self.tokenizer = make_env, fmt, tokenizer
        self.max_turns, self.max_tokens, self.max_new_tokens = max_turns, max_tokens, max_new_tokens
        self.context_window = context_window
        self.on_error, self.env_name = on_error, env_name

    def run(self, rows: list[dict], sample: SampleFn, *, group_size: int = 1) -> list[Episode]:
        episodes = [Episode(row=row, env=self.make_env(), index=i * group_size + g)
                    for i, row in enumerate(rows) for g in range(group_size)]
        openings = _call_all([lambda e=e: e.env.reset(e.row) for e in episodes])
        for e, opening in zip(episodes, openings):
            if isinstance(opening, BaseException):
                self._failed(e, "reset", opening)
                opening = e.row.get("prompt", "")
            e.opening = opening
            e.prompt_ids = self.fmt.opening(opening)
            e.conversation = self.fmt.opening_messages(opening)
        for turn in range(self.max_turns):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            budgets = [self._room(e) for e in live]
            for e, room in zip(live, budgets):
                if room <= 0:
                    self._end(e, "token_limit")
            live, budgets = [e for e in live if not e.done], [b for b in budgets if b > 0]
            if not live:
                break
            results = sample([e.prompt_ids + e.ids for e in live], min(self.max_new_tokens, max(budgets)))
            turns = []
            for e, res, room in zip(live, results, budgets):
                ids, lps, ended = res.token_ids[:room], res.logprobs[:room], res.ended and len(res.token_ids) <= room
                e.ids += ids
                e.model_mask += [1] * len(ids)
                e.logprobs += lps
                e.counts["turns"] += 1
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                e.last_text = text
                e.conversation.append({"role": "assistant", "content": text})
                turns.append(Turn(text=text, token_ids=list(ids), truncated=not ended, index=turn))
            answers = _call_all([lambda e=e, t=t: e.env.step(t) for e, t in zip(live, turns)])
            for e, t, answer in zip(live, turns, answers):
                where = f"{self.env_name}, episode {e.index} (row prompt {str(e.row.get('prompt'))[:50]!r}), turn {turn}"
                try:
                    if isinstance(answer, BaseException):
                        raise answer
                    fb = as_feedback(answer, where)
                except BaseException as err:  # noqa: BLE001 - re-raised below unless on_error=skip
                    self._failed(e, "step", err, where)
                    continue
                self._take(e, t, fb, last_turn=turn == self.max_turns - 1)
        for e in episodes:
            if not e.done:
                self._end(e, "turn_limit")
        return episodes

    def _room(self, e: Episode) -> int:
        room = self.max_tokens - len(e.ids)
        if self.context_window is not None:
            room = min(room, self.context_window - len(e.prompt_ids) - len(e.ids))
        return room

    def _take(self, e: Episode, turn: Turn, fb: Feedback, *, last_turn: bool) -> None:
        if fb.reward is not None:
            e.rewards.append((len(e.ids) - 1, fb.reward))
        for k, v in fb.info.items():
            if k in e.counts:
                e.counts[k] += int(v)
        if fb.done:
            e.done = True
            return
        if last_turn:
            self._end(e, "turn_limit")
            return
        env_ids = self.fmt.env_tokens(fb.messages, turn_ended=not turn.truncated)
        if self._room(e) - len(env_ids) < 1:  # no room left for the model's next turn
            self._end(e, "token_limit")
            return
        e.ids += env_ids
        e.model_mask += [0] * len(env_ids)
        e.logprobs += [0.0] * len(env_ids)
        e.counts["env_tokens"] += len(env_ids)
        e.conversation += [dict(m) for m in fb.messages]

    @staticmethod
    def _end(e: Episode, why: str) -> None:
        e.done = True
        e.counts[why] = 1

    def _failed(self, e: Episode, method: str, err: BaseException, where: str | None = None) -> None:
        where = where or f"{self.env_name}, episode {e.index} (row prompt {str(e.row.get('prompt'))[:50]!r})"
        if isinstance(err, EpisodeError) and self.on_error == "raise":
            raise err
        if self.on_error == "raise":
            raise EpisodeError(f"{where}: {method}() raised {type(err).__name__}: {err} (set env.on_error=skip "
                               "to end such episodes unscored)") from err
        log.debug("%s: %s() failed, episode ended unscored: %s", where, method, err)
        e.done = e.failed = True
        e.counts["env_failed"] = 1


def _call_all(calls: list[Callable]) -> list:
    """Each call's value (a coroutine's awaited value) or the exception it raised."""
    out = []
    for call in calls:
        try:
            out.append(call())
        except Exception as e:  # noqa: BLE001 - reported per episode by the caller
            out.append(e)
    if any(inspect.isawaitable(v) for v in out):
        out = run_sync(out)
    return out


def episode_tokens(fmt, tokenizer, opening, turns: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, model_mask) of a written episode (a demonstration): the opening, then each assistant turn's text
    with the end-of-turn token (EOS), each run of environment messages as `fmt.env_tokens`: exactly the
    tokens a sampled episode of the same turns has."""
    ids = list(fmt.opening(opening))
    mask = [0] * len(ids)
    pending: list[dict] = []
    for turn in turns + [None]:
        if turn is not None and turn["role"] != "assistant":
            pending.append(turn)
            continue
        if pending:
            env = fmt.env_tokens(pending, turn_ended=True)
            ids += env
            mask += [0] * len(env)
            pending = []
        if turn is not None:
            own = tokenizer(turn["content"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids += own
            mask += [1] * len(own)
    return ids, mask


# ---------------------------------------------------------------------------------------------------------
# episodes -> Rollout


def episodes_to_rollout(episodes: list[Episode], *, pad_token_id: int, group_size: int) -> Rollout:
    """The batch of a step: [opening (left-padded) | the episode's turns (right-padded)], the loss mask on
    model tokens, each turn's reward on its last token (`turn_rewards_BT`), the counters in `episode_BK`."""
    B = len(episodes)
    P = max(len(e.prompt_ids) for e in episodes)
    T = max(1, max(len(e.ids) for e in episodes))
    ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attention = torch.zeros(B, P + T, dtype=torch.long)
    mask = torch.zeros(B, T)
    logprobs = torch.zeros(B, T)
    turn_rewards = torch.zeros(B, T)
    for i, e in enumerate(episodes):
        p, n = len(e.prompt_ids), len(e.ids)
        ids[i, P - p:P] = torch.tensor(e.prompt_ids, dtype=torch.long)
        attention[i, P - p:P + n] = 1
        if n:
            ids[i, P:P + n] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, :n] = torch.tensor(e.model_mask, dtype=torch.float)
            logprobs[i, :n] = torch.tensor(e.logprobs, dtype=torch.float)
        for pos, r in e.rewards:
            turn_rewards[i, pos] += r
    counts = torch.tensor([[float(e.counts[c]) for c in EPISODE_COLUMNS] for e in episodes])
    return Rollout(
        input_ids_BL=ids, attention_mask_BL=attention, prompt_len=P, response_mask_BT=mask,
        sampler_logprobs_BT=logprobs * mask, truncated_B=torch.tensor([bool(e.counts["token_limit"]) for e in episodes]),
        prompts=[e.opening for e in episodes], completions=[e.last_text for e in episodes],
        rows=[e.row for e in episodes], group_size=group_size, turn_rewards_BT=turn_rewards,
        episode_BK=counts, conversations=[e.conversation for e in episodes],
    )


def episode_sums(episode_BK: torch.Tensor, response_mask_BT: torch.Tensor) -> torch.Tensor:
    """[K + 2]: each counter's sum over the episodes, then the model tokens and the episodes (summed over ranks
    by the caller before `episode_stats`)."""
    return torch.cat([episode_BK.double().sum(0), response_mask_BT.double().sum().view(1),
                      torch.tensor([float(len(episode_BK))], dtype=torch.float64)])


def episode_stats(sums: torch.Tensor) -> dict[str, float]:
    """episode/* per step from `episode_sums`: means per episode of turns, tool calls, tool errors and
    truncated tool outputs; the share of environment tokens among an episode's tokens; the shares of
    episodes ended by the turn limit, by the token limit, or by an environment failure."""
    col = dict(zip(EPISODE_COLUMNS, sums[:len(EPISODE_COLUMNS)].tolist()))
    model_tokens, n = sums[-2].item(), max(sums[-1].item(), 1.0)
    out = {f"episode/{k}_mean": col[k] / n for k in ("turns", "tool_calls", "tool_errors", "truncated_outputs")}
    out["episode/env_token_frac"] = col["env_tokens"] / max(col["env_tokens"] + model_tokens, 1.0)
    out.update({f"episode/{k}_frac": col[k] / n for k in ("turn_limit", "token_limit", "env_failed")})
    return out
