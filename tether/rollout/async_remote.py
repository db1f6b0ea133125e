"""Asynchronous rollouts from a generation server (`rollout.backend=vllm-server` with `rollout.max_staleness`
>= 1): the server samples the next batch while the trainer updates on this one, one step off as verl's
one-step-off mode runs it.

One background thread talks to the server and runs its calls in order: the batches asked for and, between
them, each weight push (`publish`). So a batch (every group of it) is sampled by one policy version whole, and
its version is known: the pushes done before it started. `publish` waits for its push, because the trainer's
weights must not change under the broadcast; with staleness 1 that wait is the batch in flight finishing, which
ran while the trainer updated. The reward scores each batch in that thread too (`score`), off the trainer's
path. Rows, the checkpointed sampler state and the version tags are as for the generation worker process
(`async_worker.AsyncGenerator`), which this stands in for: batches in flight are drawn again on resume.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from torch import nn

from tether.rollout.async_worker import BatchesInFlight, StaleRollout, WorkerError
from tether.rollout.batch import Rollout


class AsyncRemoteGenerator(BatchesInFlight):
    """The trainer's side of a generation server: `max_staleness + 1` batches in flight, handed over oldest first;
    `publish` pushes new weights between two batches. `score(rollout)` and `shard(rows)` as for AsyncGenerator."""

    def __init__(self, backend, *, max_staleness: int, group_size: int,
                 score: Callable[[Rollout], None] | None = None, shard: Callable[[list], list] | None = None):
        super().__init__(max_staleness, shard)
        self.backend, self.group_size, self.score = backend, group_size, score
        self.scores_in_worker, self.scoring_note = score is not None, None
        self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="tether-generate")
        self.pushed = 0  # written in the pool's thread only

    @property
    def published(self) -> int:
        return self.pushed

    def _sample(self, rows: list[dict]) -> tuple[Rollout, int]:
        version = self.pushed  # pushes run in this thread too: none is under way
        rollout = self.backend.generate(rows, [row["prompt"] for row in rows], group_size=self.group_size)
        if self.score is not None:
            self.score(rollout)
        return rollout, version

    def next(self, sampler) -> StaleRollout:
        """The oldest batch in flight (after topping the flight up with new rows from `sampler`)."""
        if self.pool is None:
            raise WorkerError("the generation thread was closed")
        self._top_up(sampler, lambda rows: self.pool.submit(self._sample, rows))
        future, state = self.in_flight.popleft()
        try:
            rollout, version = future.result()
        except Exception as e:
            self.close()
            raise WorkerError(f"the generation server's batch failed: {type(e).__name__}: {e}") from e
        return StaleRollout(rollout, version, state)

    def _push(self, policy: nn.Module) -> None:
        self.backend.sync_weights(policy)
        self.pushed += 1

    def publish(self, policy: nn.Module) -> None:
        """Push the trained weights to the server after the batches already asked for; returns once pushed."""
        try:
            self.pool.submit(self._push, policy).result()
        except Exception as e:
            self.close()
            raise WorkerError(f"pushing the weights to the generation server failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        if self.pool is None:
            return
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None
