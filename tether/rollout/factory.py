"""The sampler backend a run's config asks for: HF `generate` (CPU or GPU), vLLM colocated (GPU), or a vLLM
server."""

from __future__ import annotations

import functools

import torch

from tether.config import TrainConfig
from tether.rollout.speedups import sampler_share_prompts, sampler_weights_dtype


def make_backend(cfg: TrainConfig, policy: torch.nn.Module, tokenizer, *, autocast_dtype: torch.dtype | None,
                 fsdp: bool):
    """The rollout backend for `cfg.rollout.backend`, sampling from `policy`."""
    r, m = cfg.rollout, cfg.model
    if r.backend == "vllm":
        from tether.rollout.vllm import VLLMBackend

        return VLLMBackend(policy, tokenizer, m.path, r, chat_template=m.chat_template,
                           system_prompt=m.system_prompt, seed=cfg.seed)
    if r.backend == "vllm-server":
        from tether.rollout.vllm_server import VLLMServerBackend

        return VLLMServerBackend(policy, tokenizer, r, chat_template=m.chat_template, system_prompt=m.system_prompt)
    from tether.rollout.hf import HFGenerateBackend

    return HFGenerateBackend(policy, tokenizer, **hf_backend_kwargs(cfg, autocast_dtype=autocast_dtype, fsdp=fsdp))


def hf_backend_kwargs(cfg: TrainConfig, *, autocast_dtype: torch.dtype | None, fsdp: bool) -> dict:
    """HFGenerateBackend's settings from the config (also what the asynchronous worker builds its own with)."""
    r, m = cfg.rollout, cfg.model
    return dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                stop_strings=r.stop_strings, micro_batch_size=r.micro_batch_size, chat_template=m.chat_template,
                system_prompt=m.system_prompt, autocast_dtype=autocast_dtype,
                weights_dtype=sampler_weights_dtype(cfg, fsdp),
                compile_backend="inductor" if r.compile else None, decode_attention=r.decode_attention,
                packed_linears=r.packed_linears, inverse_cdf_sampling=r.inverse_cdf_sampling,
                batch_invariant=m.batch_invariant,
                share_prompts=sampler_share_prompts(cfg.optim.share_prompts, fsdp=fsdp))


def make_async_generator(cfg: TrainConfig, policy: torch.nn.Module, tokenizer, *,
                         autocast_dtype: torch.dtype | None, context_window: int | None, after_sampling=None,
                         score=None, seed: int | None = None, shard=None, backend=None, score_here=None):
    """The generation worker for rollout.max_staleness > 0 (None for the synchronous loop); `after_sampling`
    runs in the worker on each batch it samples, then `score` (see AsyncGenerator). With an environment the
    worker runs whole episodes, with an episode runner it builds from the config as the trainer does. With
    several ranks each has its own worker: `shard` takes the rank's rows of each globally drawn batch, and
    `seed` (default cfg.seed + 1) gives the rank's worker a sampling stream of its own.

    With rollout.backend=vllm-server the server is the worker: a thread in this process asks it for batches
    and pushes weights between them (async_remote.py), and scores with `score_here(rollout)`."""
    r = cfg.rollout
    if r.max_staleness == 0:
        return None
    if r.backend == "vllm-server":
        from tether.rollout.async_remote import AsyncRemoteGenerator

        return AsyncRemoteGenerator(backend, max_staleness=r.max_staleness, group_size=r.group_size,
                                    score=score_here, shard=shard)
    from tether.rollout.async_worker import AsyncGenerator

    kwargs = hf_backend_kwargs(cfg, autocast_dtype=autocast_dtype, fsdp=False)
    kwargs["weights_dtype"] = None  # the worker's shared copy is its own copy already
    episode_runner_factory = (functools.partial(make_episode_runner, cfg, context_window=context_window)
                              if cfg.env.name is not None else None)
    return AsyncGenerator(policy, tokenizer, backend_kwargs=kwargs, max_staleness=r.max_staleness,
                          threads=r.async_threads, seed=cfg.seed + 1 if seed is None else seed,
                          group_size=r.group_size, shard=shard,
                          after_sampling=after_sampling, make_episode_runner=episode_runner_factory,
                          score=score)


def make_episode_runner(cfg: TrainConfig, tokenizer, *, context_window: int | None):
    """The episode runner for `cfg.env` (None without an environment): environments from its factory, turns
    tokenized by the chat template's deltas (model.chat_template) or the plain format."""
    if cfg.env.name is None:
        return None
    from tether.envs.loading import load_environment_factory
    from tether.rollout.episodes import ChatFormat, EpisodeRunner, PlainFormat

    e = cfg.env
    make_env = load_environment_factory(e.name, e.options)
    tools = getattr(make_env(), "schemas", None)
    fmt = (ChatFormat(tokenizer, system_prompt=cfg.model.system_prompt, tools=tools) if cfg.model.chat_template
           else PlainFormat(tokenizer))
    return EpisodeRunner(make_env, fmt, tokenizer, max_turns=e.max_turns, max_tokens=e.max_tokens,
                         max_new_tokens=cfg.rollout.max_new_tokens, context_window=context_window,
                         on_error=e.on_error, env_name=e.name)
