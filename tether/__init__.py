"""tether: RL post-training of language models (PPO, GRPO, RLOO, DAPO, REINFORCE) tethered to a reference."""

__version__ = "0.1.0"


def fit(*args, **kwargs):
    """Train a policy in one call; see `tether.api.fit`."""
    from tether.api import fit as _fit

    return _fit(*args, **kwargs)


__all__ = ["fit", "__version__"]
