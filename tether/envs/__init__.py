"""Environments for multi-turn episodes: the protocol (base.py), tools (tools.py), built-ins (builtin.py)."""

from tether.envs.base import Environment, EpisodeError, Feedback, Turn
from tether.envs.builtin import ENVIRONMENTS
from tether.envs.loading import load_environment_factory
from tether.envs.tools import ToolEnvironment

__all__ = ["ENVIRONMENTS", "Environment", "EpisodeError", "Feedback", "ToolEnvironment", "Turn",
           "load_environment_factory"]
