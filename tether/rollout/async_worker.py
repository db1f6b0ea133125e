"""Asynchronous rollouts: a generation worker process that samples the next batches while the trainer
updates on the current one, from a policy at most `rollout.max_staleness` updates old.

Why a process: a decode step is dispatch-bound and gains little from a second core, the update is
matmul-bound; one core sampling while the other trains beats running both stages in turn on two cores
(and a thread would share the trainer's interpreter lock for generate's per-token Python).

How, on one machine:
- Weights. The worker samples from its own copy of the policy whose tensors live in shared memory
  (`share_memory_`), so after each optimiser step the trainer writes the new weights straight into it:
  no file, no pickling. A lock keeps a batch from being sampled while the weights change under it: the
  worker holds it for each batch, the trainer takes it to publish, so a batch sees one version whole.
  Every batch is tagged with the version (optimiser updates published) it was sampled from.
- Data. The trainer keeps drawing rows from its own data sampler, k + 1 batches ahead, and sends them; the
  data order is the synchronous loop's. The data sampler's state before each batch in flight is kept, so
  a checkpoint records the state of the first batch not yet trained on: batches in flight are discarded
  on resume and drawn again (the same rows, sampled anew by the resumed policy), so no row is lost or
  repeated.
- Ranks. Under DDP every rank has a worker of its own, sent the rank's share of each batch (the rows the
  synchronous loop gives it), seeded apart; each rank publishes its replica's weights, the same on all.
- Off-policy correction (decoupled PPO, Hilton et al. 2022): pi_old is the trainer's own pre-update weights
  (the proximal policy) for every batch, from its first minibatch's forward or, with several updates a
  step, an old pass; the worker's recorded log-probs are the behaviour policy's, and `algorithm.tis_cap`
  weights each token by min(pi_old / pi_behaviour, cap).
- Balance. Generation is the worker's, the update the trainer's; work that depends on neither's weights
  can go to whichever waits: the trainer hands the worker the frozen reference's pass (`after_sampling`)
  and the reward (`score`: a sandboxed program or a slow verifier then runs while the trainer updates).
- Shutdown. `close()` (also at interpreter exit) stops the worker and joins it; the worker exits with its
  parent (PR_SET_PDEATHSIG on Linux) and on any error, which reaches the trainer as an exception naming it.
"""

from __future__ import annotations

import atexit
import copy
import logging
import pickle
import queue
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.multiprocessing as mp
from torch import nn

from tether.rollout.batch import Rollout

log = logging.getLogger("tether")


class WorkerError(RuntimeError):
    """The generation worker failed or stopped; the message carries its traceback."""


@dataclass
class StaleRollout:
    rollout: Rollout
    version: int        # optimiser updates published before the batch was sampled
    sampler_state: dict  # the data sampler's state before this batch's rows were drawn


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(model, tokenizer, backend_kwargs, threads, seed, requests, results, lock, version,
                 after_sampling, make_episode_runner, score_payload) -> None:
    _die_with_parent()
    try:
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        score = None
        if score_payload is not None:  # unpickled here, so that a reward this process cannot load is reported
            try:
                score = pickle.loads(score_payload)
                results.put(("scoring", None, None, None))
            except Exception as e:  # noqa: BLE001 - the trainer scores instead, and says why
                results.put(("scoring", None, None, f"{type(e).__name__}: {e}"))
        from tether.rollout.episodes import episodes_to_rollout
        from tether.rollout.hf import HFGenerateBackend

        backend = HFGenerateBackend(model, tokenizer, **backend_kwargs)
        episodes = make_episode_runner(tokenizer) if make_episode_runner is not None else None
        while True:
            request = requests.get()
            if request is None:
                return
            request_id, rows, group_size = request
            with lock:  # the weights cannot change under a batch (nor between an episode's turns)
                v = version.value
                if episodes is not None:
                    done = episodes.run(rows, backend.sample_tokens, group_size=group_size)
                    rollout = episodes_to_rollout(done, pad_token_id=tokenizer.pad_token_id, group_size=group_size)
                else:
                    rollout = backend.generate(rows, [row["prompt"] for row in rows], group_size=group_size)
            if after_sampling is not None:  # outside the lock: it must not read the weights published
                after_sampling(model, rollout)
            if score is not None:  # overlaps the trainer's update instead of standing in its path
                score(rollout)
            results.put(("ok", request_id, v, rollout))
    except BaseException:  # noqa: BLE001 - everything must reach the trainer
        results.put(("error", None, None, traceback.format_exc()))


class BatchesInFlight:
    """The trainer's side of any generation worker: the batches asked for, oldest first, each with the data
    sampler's state before its rows were drawn (what a checkpoint keeps while the batch is in flight).
    `shard(rows)`, with several data-parallel ranks, keeps this rank's share of every batch drawn."""

    def __init__(self, max_staleness: int, shard: Callable[[list], list] | None):
        if max_staleness < 1:
            raise ValueError("max_staleness must be >= 1 for asynchronous rollouts")
        self.max_staleness, self.shard = max_staleness, shard
        self.in_flight: deque[tuple[object, dict]] = deque()

    def _top_up(self, sampler, ask: Callable[[list[dict]], object]) -> None:
        """Ask for batches of new rows until max_staleness + 1 are in flight; `ask(rows)` returns its handle."""
        while len(self.in_flight) < self.max_staleness + 1:
            state = sampler.state_dict()
            rows = sampler.next_batch()
            if self.shard is not None:
                rows = self.shard(rows)
            self.in_flight.append((ask(rows), state))

    def resume_state(self, sampler) -> dict:
        """The data sampler's state to checkpoint: before the first batch still in flight (those are drawn
        again on resume), or the sampler's own when nothing is in flight."""
        return dict(self.in_flight[0][1]) if self.in_flight else sampler.state_dict()


class AsyncGenerator(BatchesInFlight):
    """The trainer's side of the worker: keeps `max_staleness + 1` batches in flight, hands them over oldest
    first, publishes new weights, and stops the worker.

    `after_sampling(worker_policy, rollout)`, if given, runs in the worker on each batch after sampling it,
    outside the lock (so it must not depend on the trained weights: the frozen reference's log-probs); it
    must be picklable, as it travels to the spawned worker. `make_episode_runner(tokenizer)`, if given,
    builds the worker's own episode runner (its environments live in the worker), and each batch is
    group_size episodes of each row instead of completions. `score(rollout)`, if given, scores each batch in
    the worker after that; if the worker cannot unpickle it (a reward defined where the worker cannot import
    it), batches come back unscored and `scoring_note` says why. `shard`: see BatchesInFlight."""

    def __init__(self, policy: nn.Module, tokenizer, *, backend_kwargs: dict, max_staleness: int, threads: int,
                 seed: int, group_size: int, timeout_s: float = 3600.0,
                 after_sampling: Callable[[nn.Module, Rollout], None] | None = None,
                 make_episode_runner: Callable | None = None, score: Callable[[Rollout], None] | None = None,
                 shard: Callable[[list], list] | None = None):
        super().__init__(max_staleness, shard)
        self.group_size, self.timeout_s = group_size, timeout_s
        self.copy = copy.deepcopy(policy).eval().requires_grad_(False)
        for t in list(self.copy.parameters()) + list(self.copy.buffers()):
            t.share_memory_()
        ctx = mp.get_context("spawn")  # no fork of a process that already runs torch threads
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.lock = ctx.Lock()
        self.version = ctx.Value("q", 0, lock=False)  # written under self.lock only
        self.next_id = 0
        self.scores_in_worker, self.scoring_note = False, None  # known from the worker's first message
        self.process = ctx.Process(target=_worker_main, daemon=True, name="tether-generate",
                                   args=(self.copy, tokenizer, backend_kwargs, threads, seed, self.requests,
                                         self.results, self.lock, self.version, after_sampling,
                                         make_episode_runner, None if score is None else pickle.dumps(score)))
        self.process.start()
        atexit.register(self.close)

    @property
    def published(self) -> int:
        return self.version.value

    def next(self, sampler) -> StaleRollout:
        """The oldest batch in flight (after topping the flight up with new rows from `sampler`)."""
        self._top_up(sampler, self._ask)
        want, state = self.in_flight.popleft()
        kind, got, version, payload = self._receive()
        if kind == "scoring":  # the worker's first message when it was given a scorer
            self.scores_in_worker, self.scoring_note = payload is None, payload
            if payload is not None:
                log.warning("the generation worker could not load the reward (%s): it is scored in the trainer",
                            payload)
            kind, got, version, payload = self._receive()
        if kind == "error":
            self.close()
            raise WorkerError(f"the generation worker failed:\n{payload}")
        if got != want:  # the queue is FIFO on both sides; anything else is a bug
            raise WorkerError(f"the generation worker answered request {got}, expected {want}")
        return StaleRollout(payload, version, state)

    def _receive(self) -> tuple:
        """The worker's next message; a worker that died without one (killed, out of memory) is an error, not
        a wait until the timeout."""
        waited = 0.0
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                if self.process is None or not self.process.is_alive():
                    code = None if self.process is None else self.process.exitcode
                    self.close()
                    raise WorkerError(
                        f"the generation worker exited (code {code}) without sending its batch; it is started "
                        "with spawn, so a script that trains must do so under `if __name__ == \"__main__\":` "
                        "(see the worker's own error above)") from None
                if waited >= self.timeout_s:
                    raise WorkerError(f"the generation worker sent nothing for {self.timeout_s:.0f} s") from None

    def _ask(self, rows: list[dict]) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.requests.put((request_id, rows, self.group_size))
        return request_id

    @torch.no_grad()
    def publish(self, policy: nn.Module) -> None:
        """Copy the trained weights into the worker's shared copy, between two of its batches."""
        from tether.rollout.hf import copy_trainable_weights

        with self.lock:
            copy_trainable_weights(policy, self.copy)
            self.version.value += 1

    def close(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.is_alive():
                self.requests.put(None)
                self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=5)
        finally:
            self.process = None
            atexit.unregister(self.close)
