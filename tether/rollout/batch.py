"""The Rollout batch: one object that travels through every stage of a step.

Layout: `input_ids_BL = [prompt (left-padded, P) | completion (right-padded, T)]`, so completion token t
sits at position P + t and is predicted by the logits at position P + t - 1.
For an episode (rollout/episodes.py) the completion block holds every turn after the opening, the model's
and the environment's; `response_mask_BT` is 1 on the model's tokens only, `attention_mask_BL` on all of them.
Stages add fields (scores, old/ref log-probs, values, advantages) and never reach back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that make left padding exact: the first real token is position 0 in every row (as
    `generate` numbers them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    input_ids_BL: torch.Tensor           # prompt + completion token ids
    attention_mask_BL: torch.Tensor      # 1 on real prompt tokens and on completion tokens up to EOS
    prompt_len: int                      # P: width of the left-padded prompt block
    response_mask_BT: torch.Tensor       # float, 1 on completion tokens up to and including EOS
    sampler_logprobs_BT: torch.Tensor | None  # log-probs the sampler drew each token with (float32)
    truncated_B: torch.Tensor            # bool: hit max_new_tokens without EOS or a stop string
    prompts: list[str]
    completions: list[str]
    rows: list[dict]                     # dataset rows (other columns go to reward functions)
    group_size: int
    # Episodes (rollout/episodes.py); None for single completions
    turn_rewards_BT: torch.Tensor | None = None  # each environment reward on the last token of its turn
    episode_BK: torch.Tensor | None = None       # per-episode counters, columns episodes.EPISODE_COLUMNS
    conversations: list | None = None            # each episode as chat messages, roles visible
    # Added by later stages
    scores_B: torch.Tensor | None = None
    valid_B: torch.Tensor | None = None
    reward_stats: dict = field(default_factory=dict)
    scored_rows: int = 0  # how many rows `reward_stats` describe (the round as scored, before any filtering)
    in_loss_B: torch.Tensor | None = None  # bool: rows whose tokens enter the loss (None: all); overlong filter
    old_logprobs_BT: torch.Tensor | None = None
    old_entropy_BT: torch.Tensor | None = None  # entropy of pi_old, for high-entropy token selection
    full_kl_BT: torch.Tensor | None = None      # exact KL(pi_old || pi_ref) per position (kl_estimator=full)
    teacher_kl_BT: torch.Tensor | None = None   # reverse KL to a distillation teacher per model token
    ref_logprobs_BT: torch.Tensor | None = None
    old_values_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    returns_BT: torch.Tensor | None = None

    @property
    def completion_ids_BT(self) -> torch.Tensor:
        return self.input_ids_BL[:, self.prompt_len:]

    @property
    def loss_mask_BT(self) -> torch.Tensor:
        """The completion tokens that carry loss: the model's tokens of the rows in the loss."""
        if self.in_loss_B is None:
            return self.response_mask_BT
        return self.response_mask_BT * self.in_loss_B.to(self.response_mask_BT.dtype).unsqueeze(-1)

    @property
    def completion_lengths_B(self) -> torch.Tensor:
        return self.response_mask_BT.sum(-1).long()

    def __len__(self) -> int:
        return self.input_ids_BL.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "Rollout":
        """Rows `index` of every per-sequence field (used to filter groups and to split across ranks)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        kept = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                out[f.name] = v[idx]
            elif isinstance(v, list) and len(v) == len(self):
                out[f.name] = [v[i] for i in kept]
            else:
                out[f.name] = v
        return Rollout(**out)

    @staticmethod
    def concat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Join rollouts whose prompt/completion widths differ, re-padding both blocks."""
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_len for p in parts)
        T = max(p.response_mask_BT.shape[1] for p in parts)

        def pad_prompt(x, value):  # left-pad the prompt block to P
            return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=value)

        def pad_completion(x, value):  # right-pad the completion block to T
            return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

        ids, am, rm, slp = [], [], [], []
        for p in parts:
            ids.append(torch.cat([pad_prompt(p.input_ids_BL[:, :p.prompt_len], pad_token_id),
                                  pad_completion(p.completion_ids_BT, pad_token_id)], 1))
            am.append(torch.cat([pad_prompt(p.attention_mask_BL[:, :p.prompt_len], 0),
                                 pad_completion(p.attention_mask_BL[:, p.prompt_len:], 0)], 1))
            rm.append(pad_completion(p.response_mask_BT, 0.0))
            if p.sampler_logprobs_BT is not None:
                slp.append(pad_completion(p.sampler_logprobs_BT, 0.0))
        def joined(name: str):  # an optional field, kept when every part has it
            vals = [getattr(p, name) for p in parts]
            if any(v is None for v in vals):
                return None
            if name.endswith("_BT"):
                return torch.cat([pad_completion(v, 0.0) for v in vals])
            return torch.cat(vals) if isinstance(vals[0], torch.Tensor) else sum(vals, [])

        out = Rollout(
            input_ids_BL=torch.cat(ids), attention_mask_BL=torch.cat(am), prompt_len=P,
            response_mask_BT=torch.cat(rm),
            sampler_logprobs_BT=torch.cat(slp) if len(slp) == len(parts) else None,
            truncated_B=torch.cat([p.truncated_B for p in parts]),
            prompts=sum((p.prompts for p in parts), []), completions=sum((p.completions for p in parts), []),
            rows=sum((p.rows for p in parts), []), group_size=parts[0].group_size,
            turn_rewards_BT=joined("turn_rewards_BT"), episode_BK=joined("episode_BK"),
            conversations=joined("conversations"), ref_logprobs_BT=joined("ref_logprobs_BT"),
        )
        for name in ("scores_B", "valid_B"):
            vals = [getattr(p, name) for p in parts]
            if all(v is not None for v in vals):
                setattr(out, name, torch.cat(vals))
        out.reward_stats = merge_reward_stats([(p.reward_stats, p.scored_rows) for p in parts])
        out.scored_rows = sum(p.scored_rows for p in parts)
        return out


def merge_reward_stats(parts: list[tuple[dict, int]]) -> dict:
    """The per-function reward figures of several scored rounds as if scored together, exactly: rates weighted
    by rows, means and (population) stds of the scored samples from each round's count, mean and std."""
    parts = [(stats, n) for stats, n in parts if stats and n]
    if len(parts) <= 1:
        return dict(parts[0][0]) if parts else {}
    names = sorted({k[len("reward/"):-len("/mean")] for stats, _ in parts for k in stats
                    if k.startswith("reward/") and k.endswith("/mean")})
    total = sum(n for _, n in parts)
    out: dict[str, float] = {}
    for name in names:
        key = f"reward/{name}"
        rates = {r: sum(s.get(f"{key}/{r}", 0.0) * n for s, n in parts) / total for r in ("failure_rate", "none_rate")}
        # Samples each round scored: the rest failed or were None.
        counts = [n * (1 - s.get(f"{key}/failure_rate", 0.0) - s.get(f"{key}/none_rate", 0.0)) for s, n in parts]
        c = sum(counts)
        if c > 0:
            mean = sum(k * s[f"{key}/mean"] for k, (s, _) in zip(counts, parts) if k > 0) / c
            second = sum(k * (s[f"{key}/std"] ** 2 + s[f"{key}/mean"] ** 2) for k, (s, _) in zip(counts, parts) if k > 0)
            out[f"{key}/mean"], out[f"{key}/std"] = mean, max(second / c - mean**2, 0.0) ** 0.5
        else:
            out[f"{key}/mean"] = out[f"{key}/std"] = float("nan")
        out[f"{key}/failure_rate"], out[f"{key}/none_rate"] = rates["failure_rate"], rates["none_rate"]
    for k in sorted({k for stats, _ in parts for k in stats} - set(out)):  # whole-batch rates, by rows
        out[k] = sum(s.get(k, 0.0) * n for s, n in parts) / total
    return out
