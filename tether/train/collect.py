"""Stage 1 of a step, collect: draw prompts, sample G completions of each, score them; with dynamic sampling
(DAPO, Yu et al. 2025) drop the groups whose rewards are all equal and refill from further prompts. DAPO's
overlong handling is here too: the soft punishment joins the score before groups are filtered, and the
overlong filter takes cut completions out of the loss."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tether.config import TrainConfig
from tether.core.advantages import overlong_penalty
from tether.rollout.batch import Rollout
from tether.rollout.episodes import EPISODE_COLUMNS, EpisodeRunner, episodes_to_rollout
from tether.rollout.prompts import messages
from tether.train.distributed import Dist
from tether.train.errors import TrainingError

log = logging.getLogger("tether")


@dataclass
class CollectInfo:
    """What collecting cost and dropped, for the step's statistics."""

    seconds: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "score": 0.0})
    filtered_groups: int = 0
    generation_rounds: int = 0  # DAPO refill: each round samples prompts_per_step fresh prompts x group_size
    # Asynchronous rollouts: samples drawn at each staleness (updates between the sampling policy and this one)
    rows_by_staleness: dict[int, int] = field(default_factory=dict)


def score(rollout: Rollout, reward: Callable | None, device: torch.device, *, conversation: bool = False,
          system_prompt: str | None = None) -> None:
    """Fill `scores_B`, `valid_B` and `reward_stats` from the reward scorer; the dataset's columns, the
    truncation flags and the completion lengths reach the reward functions as keyword lists, and with
    `conversation` the whole conversation of each sample (its prompt messages, then the completion; for an
    episode, every turn). An episode's score is the sum of its environment rewards plus the reward functions'
    (when any are configured); an episode whose environment failed is unscored. Without reward functions
    and outside an episode (on-policy distillation alone) every score is 0."""
    episodes = rollout.turn_rewards_BT is not None
    env_total = rollout.turn_rewards_BT.sum(-1).to(device) if episodes else None
    env_ok = (rollout.episode_BK[:, EPISODE_COLUMNS.index("env_failed")] == 0).to(device) if episodes else None
    if reward is None:
        if not episodes:
            env_total = torch.zeros(len(rollout), device=device)
            env_ok = torch.ones(len(rollout), dtype=torch.bool, device=device)
        rollout.scores_B, rollout.valid_B = env_total.float(), env_ok
        rollout.reward_stats, rollout.scored_rows = {}, len(rollout)
        return
    keys = sorted({k for row in rollout.rows for k in row if k != "prompt"})
    columns: dict[str, list] = {k: [row.get(k) for row in rollout.rows] for k in keys}
    columns["truncated"] = rollout.truncated_B.tolist()
    columns["completion_lengths"] = rollout.completion_lengths_B.tolist()
    if conversation:
        columns["conversation"] = (rollout.conversations if episodes else
                                   [messages(p, system_prompt) + [{"role": "assistant", "content": c}]
                                    for p, c in zip(rollout.prompts, rollout.completions)])
    result = reward(rollout.prompts, rollout.completions, columns)
    rollout.scores_B = result.scores.float().to(device)
    rollout.valid_B = result.valid.bool().to(device)
    if episodes:
        rollout.scores_B = torch.where(rollout.valid_B, rollout.scores_B, 0.0) + env_total
        rollout.valid_B = rollout.valid_B & env_ok
    rollout.reward_stats = dict(result.stats)
    rollout.scored_rows = len(rollout)


def add_overlong_penalty(rollout: Rollout, *, max_len: int, buffer: int, factor: float) -> None:
    """Add DAPO's soft overlong punishment (core.advantages.overlong_penalty) to the scored rows' scores, and
    log it as a reward term, reward/overlong_penalty/*."""
    pen_B = overlong_penalty(rollout.completion_lengths_B, max_len=max_len, buffer=buffer,
                             factor=factor).to(rollout.scores_B.device)
    rollout.scores_B = torch.where(rollout.valid_B, rollout.scores_B + pen_B, rollout.scores_B)
    scored = pen_B[rollout.valid_B.to(pen_B.device)]
    key = "reward/overlong_penalty"
    rollout.reward_stats.update({
        f"{key}/mean": scored.mean().item() if len(scored) else float("nan"),
        f"{key}/std": scored.std(unbiased=False).item() if len(scored) else float("nan"),
        f"{key}/failure_rate": 0.0,
        f"{key}/none_rate": 1.0 - len(scored) / max(len(rollout), 1),
    })


def filter_uniform_groups(rollout: Rollout) -> tuple[Rollout, int]:
    """The groups whose valid scores are not all equal (they carry a learning signal under a group baseline),
    and how many groups were dropped."""
    G = rollout.group_size
    scores = rollout.scores_B.view(-1, G)
    valid = rollout.valid_B.view(-1, G)
    spread = torch.where(valid, scores, torch.nan)
    has_signal = (torch.nan_to_num(spread, nan=float("inf")).amin(-1)
                  < torch.nan_to_num(spread, nan=float("-inf")).amax(-1))
    keep = has_signal.nonzero().flatten()
    rows = (keep.unsqueeze(-1) * G + torch.arange(G)).flatten()
    return rollout.select(rows), int((~has_signal).sum())


def collect(cfg: TrainConfig, sampler, backend, reward: Callable | None, dist: Dist, *, pad_token_id: int,
            device: torch.device, healthy: bool = True, episodes: EpisodeRunner | None = None,
            async_generator=None) -> tuple[Rollout, CollectInfo]:
    """This rank's scored rollout of the step (prompts_per_step / ranks prompts x group_size completions, or
    with `episodes`, group_size episodes of each row). With `async_generator` (rollout.max_staleness > 0)
    each round comes from the generation worker, sampled up to max_staleness updates ago; DAPO's refill rounds
    take the worker's next batches."""
    a, r = cfg.algorithm, cfg.rollout
    if reward is None and episodes is None and cfg.model.teacher_path is None:
        raise TrainingError("no reward to score completions with")
    wanted = r.prompts_per_step // dist.world_size
    info = CollectInfo()

    def sample_round() -> Rollout:  # one round: prompts_per_step fresh prompts x group_size
        t0 = time.perf_counter()
        if async_generator is not None:
            rollout = _from_worker(async_generator, sampler, device, info)
        else:
            rollout = _generate(backend, dist.shard(sampler.next_batch(), 1), r.group_size, healthy, episodes,
                                pad_token_id)
        info.seconds["generate"] += time.perf_counter() - t0  # async: the wait (it overlapped the update)
        info.generation_rounds += 1
        return rollout

    kept: list[Rollout] = []
    n_groups = 0
    for _ in range(1 + (a.max_filter_rounds if a.filter_groups else 0)):
        rollout = sample_round()
        t0 = time.perf_counter()
        if rollout.scores_B is None:  # else scored in the generation worker (WorkerScoring)
            score_round(rollout, reward, cfg, device)
        info.seconds["score"] += time.perf_counter() - t0
        if a.filter_groups:
            rollout, dropped = filter_uniform_groups(rollout)
            info.filtered_groups += dropped
        kept.append(rollout)
        n_groups += len(rollout) // r.group_size
        if not a.filter_groups or n_groups >= wanted:
            break
    rollout = Rollout.concat([k for k in kept if len(k)] or kept[:1], pad_token_id)
    if a.filter_groups and len(rollout) > wanted * r.group_size:
        rollout = rollout.select(list(range(wanted * r.group_size)))
    if len(rollout) == 0:
        raise TrainingError("every group had identical rewards after all refill rounds "
                            "(algorithm.filter_groups): nothing to learn from; check the reward")
    return filter_overlong(rollout, cfg), info


def score_round(rollout: Rollout, reward: Callable | None, cfg: TrainConfig, device: torch.device) -> None:
    """Score one round of samples: the reward (`score`), then DAPO's soft overlong punishment if configured."""
    score(rollout, reward, device, conversation=cfg.reward.conversation, system_prompt=cfg.model.system_prompt)
    a = cfg.algorithm
    if a.overlong_buffer is not None:
        add_overlong_penalty(rollout, max_len=cfg.rollout.max_new_tokens, buffer=a.overlong_buffer,
                             factor=a.overlong_penalty)


class WorkerScoring:
    """`score_round` in the generation worker (rollout.max_staleness > 0), on each batch right after it is
    sampled: the reward (a sandboxed program's run, a slow verifier) then overlaps the trainer's update instead
    of standing in its path. The reward travels pickled (`to_another_process`, which brings the files of
    `path.py:fn` rewards along); scores are computed on the CPU and moved to the trainer's device on arrival."""

    def __init__(self, reward: Callable | None, cfg: TrainConfig):
        from tether.rewards.functions import to_another_process

        # A scorer built from the config (run.build_reward) is built again there from its recipe: factories'
        # closures (builtin:format with kwargs, say) do not pickle, the config they came from does.
        recipe = getattr(reward, "recipe", None)
        self.payload, self.from_recipe, self.cfg, self.reward = None, False, cfg, None
        if recipe is not None:
            try:
                self.payload, self.from_recipe = to_another_process(recipe), True
            except Exception:  # noqa: BLE001 - a recipe with unpicklable extras: try the scorer itself
                pass
        if self.payload is None:
            self.payload = to_another_process(reward)

    def __getstate__(self) -> dict:
        return {"payload": self.payload, "from_recipe": self.from_recipe, "cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        from tether.rewards.functions import from_another_process

        made = from_another_process(state["payload"])
        self.__dict__.update(state, reward=made() if state["from_recipe"] else made)

    def __call__(self, rollout: Rollout) -> None:
        score_round(rollout, self.reward, self.cfg, torch.device("cpu"))

    @staticmethod
    def for_run(cfg: TrainConfig, reward: Callable | None) -> "WorkerScoring | None":
        """The worker's scorer, or None where the trainer scores (logged with the reason)."""
        if cfg.reward.reward_model:
            log.info("asynchronous rollouts: the reward model scores in the trainer (a copy in the generation "
                     "worker would double its memory)")
            return None
        try:
            return WorkerScoring(reward, cfg)
        except Exception as e:  # noqa: BLE001 - whatever pickling raises (a lambda, a local function, a lock)
            log.warning("asynchronous rollouts: the reward does not pickle (%s: %s), so it is scored in the "
                        "trainer, in the step's path; define it at module level to score it in the generation "
                        "worker", type(e).__name__, e)
            return None


def filter_overlong(rollout: Rollout, cfg: TrainConfig) -> Rollout:
    """DAPO's overlong filter (algorithm.overlong_filter): completions cut at the budget carry no loss."""
    if cfg.algorithm.overlong_filter:
        rollout.in_loss_B = ~rollout.truncated_B
    return rollout


def _from_worker(async_generator, sampler, device: torch.device, info: CollectInfo) -> Rollout:
    """The generation worker's oldest batch in flight, on the trainer's device; its rows counted at its
    staleness in `info` (a refill round is sampled after the batch before it, so it is never staler)."""
    from tether.rollout.async_worker import WorkerError

    try:
        stale = async_generator.next(sampler)
    except WorkerError as e:
        raise TrainingError(str(e)) from None
    staleness = async_generator.published - stale.version
    rollout = stale.rollout
    info.rows_by_staleness[staleness] = info.rows_by_staleness.get(staleness, 0) + len(rollout)
    for name in ("input_ids_BL", "attention_mask_BL", "response_mask_BT", "sampler_logprobs_BT", "truncated_B",
                 "ref_logprobs_BT", "scores_B", "valid_B"):  # the worker's reference pass and scores, if any
        if getattr(rollout, name) is not None:
            setattr(rollout, name, getattr(rollout, name).to(device))
    return rollout


def _generate(backend, rows: list[dict], group_size: int, healthy: bool, episodes: EpisodeRunner | None,
              pad_token_id: int) -> Rollout:
    try:
        if episodes is not None:
            done = episodes.run(rows, backend.sample_tokens, group_size=group_size)
            return episodes_to_rollout(done, pad_token_id=pad_token_id, group_size=group_size)
        return backend.generate(rows, [row["prompt"] for row in rows], group_size=group_size)
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise TrainingError(
            "sampling got non-finite next-token probabilities: the policy's weights no longer give finite "
            "logits" + ("" if healthy else " since an unstable update (see the warning above); resume from the "
                        "last healthy checkpoint with a lower optim.lr")) from e


def rows_that_fit(rows: list[dict], cfg: TrainConfig, tokenizer, context_window: int | None) -> list[dict]:
    """The rows whose prompt, as the sampler will feed it (chat template included), leaves room for
    rollout.max_new_tokens in the context window (or is within rollout.max_prompt_tokens). The others are
    skipped with one warning, or are a DataError under data.on_bad_row=error, before anything runs."""
    from tether.data import DataError
    from tether.rollout.hf import prompt_token_count

    r = cfg.rollout
    if context_window is None and not r.max_prompt_tokens:
        return rows
    limit = r.max_prompt_tokens or (context_window - r.max_new_tokens)
    why = (f"rollout.max_prompt_tokens={limit}" if r.max_prompt_tokens else
           f"the context window of {context_window} tokens less rollout.max_new_tokens={r.max_new_tokens}")
    kept, too_long = [], []
    for i, row in enumerate(rows):
        n = prompt_token_count(tokenizer, row["prompt"], chat_template=cfg.model.chat_template,
                               system_prompt=cfg.model.system_prompt)
        if n <= limit:
            kept.append(row)
            continue
        problem = f"row {i}: prompt of {n} tokens does not fit {why} (limit {limit}): {str(row['prompt'])[:60]!r}"
        if cfg.data.on_bad_row == "error":
            raise DataError(f"{problem}; shorten it, raise the limit, or set data.on_bad_row=skip")
        too_long.append(problem)
    if not kept:
        raise DataError(f"all {len(rows)} prompts are too long: {too_long[0]}")
    if too_long:
        log.warning("skipped %d of %d prompts that do not fit (data.on_bad_row=skip); first: %s",
                    len(too_long), len(rows), too_long[0])
    return kept
