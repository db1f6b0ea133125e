"""Data parallel (DDP) and sharded (FSDP2) training over gloo on CPU: rank invariance, rank-0-only writes,
checkpoints that resume at another number of ranks.

The multi-process parts run this file as a script (`python test_distributed.py SPEC.json`), once per rank,
with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the workers go through
`Dist.from_env()` exactly as under torchrun, without torchrun's seconds of agent start-up. One launch runs
several jobs in a row in one process group; the tests then check what they left on disk.

Rollouts are made deterministic by a top-1 warper added to the sampler behind the config's back (greedy
whatever the RNG): the sampling RNG necessarily differs between one rank drawing the whole batch and two
ranks drawing halves. The config keeps top_k=0, so the training log-probs are the full softmax at the
temperature and the update is a real one (with rollout.top_k=1 the trainer would, rightly, evaluate the
one-token distribution greedy sampling draws from, whose policy gradient is 0). PPO (critic, GAE, whitening over the
batch, 2 epochs x 2 minibatches) and REINFORCE (batch-mean baseline) both need batch-wide statistics.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Distinct prompts of different lengths: each rank left-pads its share to its own longest prompt.
PROMPTS = [{"prompt": p} for p in ["a", "bc", "cat", "dogs", "e", "fish", "go", "hat", "i", "jump", "kite", "lo",
                                   "moon", "n", "owl", "pi"]]
WORLD = 2
LR = {"optim.lr": 1e-3, "optim.critic_lr": 1e-3, "optim.adam_eps": 1e-6}
LORA = {"model.lora.r": 4, "model.lora.alpha": 8, "optim.lr": 1e-2}
# Float tolerance on weights after the step's updates. One process and two ranks compute the same gradients
# in another order of summation, so they differ by a reordering error dg of float32 sums. Adam turns a
# gradient g into a step lr * m / (sqrt(v) + eps), whose sensitivity to g is at most lr / eps per update:
# a weight's difference after n updates is at most n * lr * dg / eps. At eps 1e-8 that factor is 1e5 and a
# gradient that is float noise around 0 (dg ~ 1e-10) moved weights by 1e-5 on an AVX2 CPU; with
# eps 1e-6 (far below this model's real gradients, so the steps are still ~lr) it is 1e3, and ATOL = 1e-5
# admits dg up to ATOL * eps / (n * lr) = 2.5e-9 at n = 4 updates: 40 float32 units (2^-24) of a gradient
# sum of magnitude 1e-3, well above what reordering gives. Measured here: <= 5e-7 (eps 1e-6), 4.3e-6 (1e-8).
ATOL = 1e-5


def char_score(prompts, completions, **_):
    """Deterministic scores that differ between completions, so greedy rollouts have non-zero advantages."""
    return [(sum(ord(ch) for ch in c) % 17) / 17.0 for c in completions]


def base_config(model: str, algo: str) -> dict:
    return {"model": {"path": model}, "algorithm": {"name": algo}, "steps": 10, "seed": 0,
            "rollout": {"max_new_tokens": 6, "prompts_per_step": 8, "group_size": 2},
            "optim": {"micro_batch_size": 4}, "logging": {"progress": False, "tensorboard": False}}


def make_cfg(model: str, algo: str, overrides: dict):
    from tether.config import resolve_config

    return resolve_config(base_config(model, algo), [f"{k}={v}" for k, v in {**LR, **overrides}.items()])


def make_greedy(backend) -> None:
    """Greedy draws from an HF sampler whose config samples (see the module docstring)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    backend.warpers.append(TopKLogitsWarper(1))


def make_trainer(model: str, algo: str, overrides: dict, *, run_dir=None, dist=None, greedy: bool = True):
    from tether.rewards.functions import RewardScorer
    from tether.train.loop import Trainer

    t = Trainer(make_cfg(model, algo, overrides), rows=PROMPTS, reward_fn=RewardScorer([(char_score, 1.0)]),
                run_dir=run_dir, dist=dist)
    if greedy:
        make_greedy(t.backend)
    return t


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """Full weights of the policy and critic (gathered when sharded: every rank calls it, rank 0 gets them)."""
    from tether.train.distributed import full_state_dict

    out = {f"policy.{k}": v for k, v in full_state_dict(trainer.policy).items()}
    if trainer.critic is not None:
        out.update({f"critic.{k}": v for k, v in full_state_dict(trainer.critic).items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# worker side (each rank runs this file as a script)


def _worker(spec_path: str) -> None:
    from tether.train.checkpoint import latest_checkpoint
    from tether.train.distributed import Dist

    from tether.rollout.hf import HFGenerateBackend

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    dist = Dist.from_env("gloo")
    original_init = HFGenerateBackend.__init__

    def greedy_init(self, *args, **kwargs):  # reaches the samplers that run_training builds too
        original_init(self, *args, **kwargs)
        make_greedy(self)

    HFGenerateBackend.__init__ = greedy_init
    if not dist.is_main:
        _audit_writes(spec["watch"], out / f"rank{dist.rank}_writes.json")
    returned = {}
    for job in spec["jobs"]:
        cfg = make_cfg(spec["model"], job["algo"], job.get("overrides", {}))
        if job.get("run_training"):  # the whole job runner: logs, checkpoints
            from tether.train.run import run_training

            res = run_training(cfg, rows=PROMPTS, reward_functions=[char_score], run_dir=job["run_dir"], dist=dist)
            t, metrics, saved = res.trainer, res.metrics, res.checkpoint
            # What this rank's RNG draws next after the checkpoint: a resumed rank must draw the same.
            returned[f"{job['name']}/next_draw"] = torch.rand(4).tolist()
        else:
            t = make_trainer(spec["model"], job["algo"], job.get("overrides", {}), run_dir=job.get("run_dir"),
                             dist=dist, greedy=False)
            if job.get("draws"):
                t.backend.warpers = t.backend.warpers[:-1]  # this job samples
            if job.get("resume"):
                t.load(latest_checkpoint(job["resume"], clean=False))  # only rank 0 may clean up
                returned[f"{job['name']}/next_draw"] = torch.rand(4).tolist()
            if job.get("draws"):  # every rank samples the same prompts: the draws must differ between ranks
                r = t.backend.generate(PROMPTS[:4], [p["prompt"] for p in PROMPTS[:4]], group_size=2)
                returned[f"{job['name']}/draws"] = r.completions
            if job.get("uneven_generate"):
                # FSDP: every forward all-gathers, so ranks that finish sampling early must keep stepping
                # (synced_gpus) until all have; here rank r stops after 2 + 3r tokens.
                t.backend.max_new_tokens = 2 + 3 * dist.rank
                r = t.backend.generate(PROMPTS[:2], [p["prompt"] for p in PROMPTS[:2]], group_size=2)
                returned[f"{job['name']}/generated_width"] = r.response_mask_BT.shape[1]
                t.backend.max_new_tokens = cfg.rollout.max_new_tokens
            results, metrics = [], []
            for _ in range(job.get("steps", 1)):
                results.append(t.step())
                metrics.append(results[-1].metrics | {"step": t.step_count})
            if job.get("record_prompts"):  # the groups this rank trained on, step by step
                returned[f"{job['name']}/prompts"] = [r.rollout.prompts[::r.rollout.group_size] for r in results]
            if t.async_generator is not None:
                worker = t.async_generator.process
                t.close()
                returned[f"{job['name']}/worker_alive"] = worker.is_alive()
            saved = t.save(keep_last=2) if job.get("save") else None
        returned[job["name"]] = str(saved) if saved else None
        weights = trained_weights(t)
        if dist.is_main:
            torch.save({"weights": weights, "metrics": metrics, "step": t.step_count}, out / f"{job['name']}.pt")
        dist.barrier()
    (out / f"rank{dist.rank}_returned.json").write_text(json.dumps(returned))


_WRITES: list = []


def _audit_writes(watch: list[str], report: Path) -> None:
    """Record every Python-level file write, mkdir, rename or removal under the watched directories."""
    import atexit

    roots = [os.path.realpath(w) for w in watch]

    def inside(path) -> bool:
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and inside(args[0]):
                _WRITES.append([event, os.fsdecode(args[0])])
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move",
                       "shutil.copyfile"):
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and inside(args[0]):
                _WRITES.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)
    atexit.register(lambda: report.write_text(json.dumps(_WRITES)))


# ----------------------------------------------------------------------------------------------------------
# launcher side


def _can_launch() -> str | None:
    """Why multi-process tests cannot run here, or None."""
    import torch.distributed as tdist

    if not tdist.is_available() or not tdist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this build"
    try:
        _free_port()
    except OSError as e:
        return f"cannot open a TCP port on 127.0.0.1 for the process group: {e}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, jobs: list[dict], out: Path, *, world: int = WORLD, watch=(), timeout: float = 180) -> dict:
    """Run `jobs` in `world` processes (one process group) as torchrun would; raise with their logs on failure.
    Returns what each job's rank-0 process saved (weights, metrics), by job name."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": model, "jobs": jobs, "out": str(out), "watch": [str(w) for w in watch]}))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, str(spec)], stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
    finally:
        for log in logs:
            log.close()
    codes = [p.wait() for p in procs]
    if any(codes):
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n" + (out / f"rank{r}.log").read_text()[-5000:]
                          for r, c in enumerate(codes))
        raise AssertionError(f"distributed workers failed (timeout {timeout} s):\n{tails}")
    return {job["name"]: torch.load(out / f"{job['name']}.pt", weights_only=False) for job in jobs}


# ----------------------------------------------------------------------------------------------------------
# tests

_WHY_NOT = _can_launch()
multiprocess = pytest.mark.skipif(_WHY_NOT is not None, reason=f"cannot start worker processes: {_WHY_NOT}")


def fake_rank(rank: int, world: int):
    from tether.train.distributed import Dist

    d = Dist()
    d.enabled, d.rank, d.world_size = world > 1, rank, world
    return d


@pytest.mark.parametrize("rows,minibatches", [(16, 2), (12, 4), (8, 8)])
def test_minibatches_are_the_same_rows_at_any_number_of_ranks(rows, minibatches):
    seed = (0, 3, 1)
    whole = fake_rank(0, 1).minibatch_order(rows, minibatches, seed).tensor_split(minibatches)
    assert sorted(torch.cat(whole).tolist()) == list(range(rows))
    assert all(len(mb) == rows // minibatches for mb in whole)
    for world in (2, 4):
        if rows % (world * minibatches):
            continue
        local = rows // world
        parts = [fake_rank(r, world).minibatch_order(local, minibatches, seed).tensor_split(minibatches)
                 for r in range(world)]
        for j in range(minibatches):
            assert len({len(p[j]) for p in parts}) == 1  # every rank holds as many rows of minibatch j
            rows_j = sorted(int(i) + r * local for r, p in enumerate(parts) for i in p[j])
            assert rows_j == sorted(whole[j].tolist())
    other = fake_rank(0, 1).minibatch_order(rows, minibatches, (0, 4, 1)).tensor_split(minibatches)
    assert any(not torch.equal(a.sort().values, b.sort().values) for a, b in zip(whole, other))


def test_split_to_count_keeps_rows_and_order():
    from tether.train.distributed import split_to_count

    parts = [torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5]), torch.tensor([6, 7])]
    out = split_to_count(parts, 5)
    assert len(out) == 5 and torch.cat(out).tolist() == list(range(8)) and all(len(p) for p in out)
    with pytest.raises(ValueError):
        split_to_count(parts, 9)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from tether.tasks.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("llama"), hidden_size=32, num_layers=2, seed=0))


@pytest.fixture(scope="module")
def single(model):
    """One-process references: initial and one-step weights and metrics of each preset."""
    out = {}
    for name, algo, over in (("ppo", "ppo", {}), ("reinforce", "reinforce", {}),
                             ("ppo_shared", "ppo", {"algorithm.critic": "shared"})):
        t = make_trainer(model, algo, over)
        init = trained_weights(t)
        m = t.step().metrics
        out[name] = {"init": init, "weights": trained_weights(t), "metrics": m}
    return out


@pytest.fixture(scope="module")
def ddp(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    run = base / "run"
    jobs = [
        {"name": "ppo", "algo": "ppo"},
        {"name": "reinforce", "algo": "reinforce"},
        # A critic that shares the policy's trunk: two DDP modules (policy, value head) in one backward.
        {"name": "ppo_shared", "algo": "ppo", "overrides": {"algorithm.critic": "shared"}},
        # Micro-batches by token budget: ranks may pack their rows into different numbers of micro-batches.
        {"name": "ppo_budget", "algo": "ppo", "overrides": {"optim.token_budget": 20}},
        # The job runner (logs + checkpoint at the end), 2 steps; then every rank resumes from it.
        {"name": "trained", "algo": "ppo", "run_training": True, "run_dir": str(run),
         "overrides": {"steps": 2}},
        {"name": "resumed", "algo": "ppo", "resume": str(run)},
        # Asynchronous rollouts: a generation worker per rank, each sent that rank's share of every batch.
        {"name": "async", "algo": "grpo", "overrides": {"rollout.max_staleness": 1}, "steps": 3,
         "record_prompts": True},
        # Sampled (not greedy) draws of the same prompts on every rank.
        {"name": "sampled", "algo": "grpo", "overrides": {"rollout.top_k": 0, "rollout.max_new_tokens": 12},
         "draws": True, "steps": 0},
    ]
    t0 = time.perf_counter()
    res = launch(model, jobs, base / "out", watch=[run])
    return {"res": res, "run": run, "out": base / "out", "seconds": time.perf_counter() - t0}


def assert_same_weights(got: dict, want: dict, init: dict | None = None) -> None:
    assert got.keys() == want.keys()
    worst = max(((got[k] - want[k]).abs().max().item(), k) for k in want)
    assert worst[0] <= ATOL, worst
    if init is not None:  # the comparison is not vacuous: the step moved the weights well past the tolerance
        moved = max((want[k] - init[k]).abs().max().item() for k in want)
        assert moved > 50 * ATOL, moved  # Adam's first step moves a weight by lr * g / (|g| + eps), just < lr


@pytest.mark.parametrize("algo", ["ppo", "reinforce", "ppo_shared"])
@multiprocess
def test_ddp_step_matches_one_process(ddp, single, algo):
    got, ref = ddp["res"][algo], single[algo]
    assert_same_weights(got["weights"], ref["weights"], ref["init"])
    m, r = got["metrics"][0], ref["metrics"]
    assert m["reward/mean"] == pytest.approx(r["reward/mean"], abs=1e-6)
    assert m["loss/policy"] == pytest.approx(r["loss/policy"], abs=1e-5)
    assert m["advantages/std"] > 0.1  # distinct prompts: a real learning signal
    if algo.startswith("ppo"):
        assert m["update/optimizer_steps"] == 4


@multiprocess
def test_ddp_token_budget_micro_batches_match_one_process(ddp, single):
    got, ref = ddp["res"]["ppo_budget"], single["ppo"]
    assert_same_weights(got["weights"], ref["weights"], ref["init"])


@multiprocess
def test_ranks_draw_different_samples_and_resume_their_own_streams(ddp):
    """Each rank samples from its own seed (seed, rank): the same prompts give different draws on the two
    ranks. A checkpoint holds every rank's RNG state, and a resumed rank draws what it would have drawn."""
    returned = [json.loads((ddp["out"] / f"rank{r}_returned.json").read_text()) for r in range(WORLD)]
    assert returned[0]["sampled/draws"] != returned[1]["sampled/draws"]
    assert returned[0]["trained/next_draw"] != returned[1]["trained/next_draw"]
    for r in range(WORLD):
        assert returned[r]["resumed/next_draw"] == returned[r]["trained/next_draw"]


@multiprocess
def test_async_rollouts_run_a_worker_per_rank_on_its_share(ddp, model):
    """rollout.max_staleness=1 under DDP: each rank's worker samples exactly the rows the synchronous loop gives
    that rank (its contiguous share of every globally drawn batch), no batch is staler than one update, and
    every worker is gone once its trainer closes."""
    returned = [json.loads((ddp["out"] / f"rank{r}_returned.json").read_text()) for r in range(WORLD)]
    drawn = make_trainer(model, "grpo", {}).sampler  # the same seed: the batches every rank draws
    batches = [[row["prompt"] for row in drawn.next_batch()] for _ in range(3)]
    share = len(batches[0]) // WORLD
    for r in range(WORLD):
        assert returned[r]["async/prompts"] == [b[r * share:(r + 1) * share] for b in batches]
        assert returned[r]["async/worker_alive"] is False
    metrics = ddp["res"]["async"]["metrics"]
    assert metrics[0]["rollout/staleness"] == 0.0 and all(m["rollout/staleness"] <= 1.0 for m in metrics)
    assert all(math.isfinite(m["loss/total"]) for m in metrics)


@multiprocess
def test_only_rank0_writes(ddp):
    out, run = ddp["out"], ddp["run"]
    writes = json.loads((out / "rank1_writes.json").read_text())
    assert writes == [], writes
    returned = [json.loads((out / f"rank{r}_returned.json").read_text()) for r in range(WORLD)]
    assert returned[0]["trained"] and returned[1]["trained"] is None  # save() returns the path on rank 0 only
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in lines] == [1, 2]  # logged once per step, by one process
    assert (run / "config.yaml").exists()


@multiprocess
def test_every_rank_resumes_and_continues(ddp, model, tmp_path):
    """2-rank checkpoint -> 2 ranks resume and step (ddp["res"]["resumed"]) == 1 process resumes and steps."""
    from tether.train.checkpoint import latest_checkpoint

    trained, resumed = ddp["res"]["trained"], ddp["res"]["resumed"]
    assert trained["step"] == 2 and resumed["step"] == 3 and resumed["metrics"][0]["step"] == 3
    t = make_trainer(model, "ppo", {}, run_dir=tmp_path / "resume")
    t.load(latest_checkpoint(ddp["run"]))
    assert t.step_count == 2
    assert_same_weights(trained_weights(t), trained["weights"])  # exactly what the 2 ranks trained
    m = t.step().metrics
    assert t.step_count == 3 and all(math.isfinite(v) for v in m.values())
    assert_same_weights(resumed["weights"], trained_weights(t))


# FSDP2 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    # A checkpoint written by one process, for the 1 -> 2 rank resume.
    single_run = base / "single_run"
    t = make_trainer(model, "ppo", {}, run_dir=single_run)
    for _ in range(2):
        t.step()
    t.save(keep_last=1)
    fs = {"distributed.strategy": "fsdp"}
    lora = {**fs, **LORA}
    jobs = [
        {"name": "ppo", "algo": "ppo", "overrides": fs, "uneven_generate": True},
        {"name": "trained", "algo": "ppo", "overrides": fs, "steps": 2, "run_dir": str(base / "run"),
         "save": True},
        {"name": "from_single", "algo": "ppo", "overrides": fs, "resume": str(single_run)},
        {"name": "lora", "algo": "reinforce", "overrides": lora, "steps": 2, "run_dir": str(base / "lora_run"),
         "save": True},
        {"name": "lora_resumed", "algo": "reinforce", "overrides": lora, "resume": str(base / "lora_run")},
    ]
    res = launch(model, jobs, base / "out", watch=[base / "run", base / "lora_run"])
    return {"res": res, "base": base, "single_run": single_run, "out": base / "out"}


@multiprocess
def test_fsdp_step_matches_one_process(fsdp, single):
    got, ref = fsdp["res"]["ppo"], single["ppo"]
    assert_same_weights(got["weights"], ref["weights"], ref["init"])
    assert got["metrics"][0]["loss/policy"] == pytest.approx(ref["metrics"]["loss/policy"], abs=1e-5)


@multiprocess
def test_fsdp_generation_with_uneven_lengths(fsdp):
    """Sharded parameters are gathered in every forward: a rank that stops sampling early keeps stepping."""
    widths = [json.loads((fsdp["out"] / f"rank{r}_returned.json").read_text())["ppo/generated_width"]
              for r in range(WORLD)]
    assert widths == [2, 5]


@multiprocess
def test_fsdp_checkpoint_resumes_in_one_process(fsdp, model, tmp_path):
    from tether.train.checkpoint import latest_checkpoint

    trained = fsdp["res"]["trained"]
    assert trained["step"] == 2
    assert json.loads((fsdp["out"] / "rank1_writes.json").read_text()) == []
    t = make_trainer(model, "ppo", {}, run_dir=tmp_path / "resume")
    t.load(latest_checkpoint(fsdp["base"] / "run"))
    assert t.step_count == 2
    assert_same_weights(trained_weights(t), trained["weights"])
    m = t.step().metrics
    assert t.step_count == 3 and all(math.isfinite(v) for v in m.values())
    # The optimiser state came back too (AdamW moments for every trained tensor).
    assert all(len(s) > 0 for s in t.optimizers["policy"].state.values())


@multiprocess
def test_one_process_checkpoint_resumes_in_two_fsdp_ranks(fsdp, model):
    from tether.train.checkpoint import latest_checkpoint

    t = make_trainer(model, "ppo", {})
    t.load(latest_checkpoint(fsdp["single_run"]))
    t.step()
    got = fsdp["res"]["from_single"]
    assert got["step"] == 3 == t.step_count
    assert_same_weights(got["weights"], trained_weights(t))


@multiprocess
def test_fsdp_lora_checkpoint_is_the_adapter_and_resumes_in_one_process(fsdp, model, tmp_path):
    from tether.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(fsdp["base"] / "lora_run")
    policy_dir = ck / "policy"
    assert (policy_dir / "adapter_config.json").exists()
    weight_bytes = sum(f.stat().st_size for f in policy_dir.iterdir() if f.suffix in (".safetensors", ".bin"))
    full_bytes = sum(v.numel() * v.element_size() for k, v in fsdp["res"]["lora"]["weights"].items()
                     if "lora_" not in k)
    assert 0 < weight_bytes < full_bytes / 4, (weight_bytes, full_bytes)
    init = trained_weights(make_trainer(model, "reinforce", LORA))
    t = make_trainer(model, "reinforce", LORA, run_dir=tmp_path / "r")
    t.load(ck)
    got = trained_weights(t)
    assert_same_weights(got, fsdp["res"]["lora"]["weights"], init)  # the adapters did move
    assert all(torch.equal(got[k], init[k]) for k in got if "lora_" not in k)  # the base did not
    m = t.step().metrics
    assert t.step_count == 3 and all(math.isfinite(v) for v in m.values())
    # ... and two FSDP ranks resuming the same adapter checkpoint take the same step.
    assert_same_weights(fsdp["res"]["lora_resumed"]["weights"], trained_weights(t))


if __name__ == "__main__":
    _worker(sys.argv[1])
