"""Rewards: reward functions and their combination, built-in rewards, a code sandbox, and learned reward models.

`tether.rewards.reward_model` (RewardModelScorer) and `tether.rewards.training` (train_reward_model) import
transformers, so they are not imported here; import them from their modules.
"""

from tether.rewards.builtin import (
    BUILTIN_REWARDS,
    format_reward,
    length_penalty,
    make_math_answer_reward,
    math_answer_reward,
    missing_eos_penalty,
)
from tether.rewards.functions import (
    RESERVED_COLUMNS,
    RewardError,
    RewardFunctionSpec,
    RewardResult,
    RewardScorer,
    load_reward_function,
)
from tether.rewards.sandbox import SandboxResult, code_tests_reward, run_sandboxed

__all__ = [
    "BUILTIN_REWARDS",
    "RESERVED_COLUMNS",
    "RewardError",
    "RewardFunctionSpec",
    "RewardResult",
    "RewardScorer",
    "SandboxResult",
    "code_tests_reward",
    "format_reward",
    "length_penalty",
    "load_reward_function",
    "make_math_answer_reward",
    "math_answer_reward",
    "missing_eos_penalty",
    "run_sandboxed",
]
