import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tether.train.checkpoint import (
    CheckpointError,
    GracefulStop,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_llama(tie: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def tiny_critic(seed: int):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"<unk>": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def make_trainer(tie: bool, seed: int):
    policy, critic = tiny_llama(tie, seed), tiny_critic(seed + 1)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return policy, critic, optimizer, scheduler


def train_step(policy, critic, optimizer, scheduler):
    ids = torch.arange(8).reshape(1, 8)
    out = policy(input_ids=ids, labels=ids, output_hidden_states=True)
    loss = out.loss + critic(out.hidden_states[-1]).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def draws():
    return random.random(), np.random.rand(), torch.rand(3).tolist()


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip(tmp_path, tie):
    policy, critic, optimizer, scheduler = make_trainer(tie, seed=0)
    train_step(policy, critic, optimizer, scheduler)
    state = {"kl_controller": {"beta": 0.05}, "sampler": {"epoch": 1, "position": 3}, "config_hash": "abc"}
    path = save_checkpoint(
        tmp_path, 10, models={"policy": policy, "critic": critic}, optimizers={"main": optimizer},
        schedulers={"main": scheduler}, state=state, tokenizer=tiny_tokenizer(),
    )
    assert path == tmp_path / "checkpoints" / "step-000010"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "MANIFEST.json", "critic", "optimizers.pt", "policy", "rng.pt", "schedulers.pt", "trainer_state.json",
    ]
    expected_draws = draws()

    # Fresh objects with different weights, one step of different training, scrambled RNGs.
    policy2, critic2, optimizer2, scheduler2 = make_trainer(tie, seed=123)
    assert not torch.equal(policy2.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    loaded = load_checkpoint(
        path, models={"policy": policy2, "critic": critic2}, optimizers={"main": optimizer2},
        schedulers={"main": scheduler2},
    )
    assert loaded == {"step": 10, **state}
    assert draws() == expected_draws
    assert_same_weights(policy, policy2)
    assert_same_weights(critic, critic2)
    if tie:
        assert policy2.lm_head.weight is policy2.model.embed_tokens.weight
    assert scheduler2.state_dict() == scheduler.state_dict()

    # Optimizer moments and step counts came back too: one more step lands both runs on the same weights.
    train_step(policy, critic, optimizer, scheduler)
    train_step(policy2, critic2, optimizer2, scheduler2)
    assert_same_weights(policy, policy2)
    assert_same_weights(critic, critic2)


def test_policy_dir_is_a_loadable_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = tiny_llama(tie=True, seed=0)
    path = save_checkpoint(tmp_path, 1, models={"policy": policy}, tokenizer=tiny_tokenizer())
    reloaded = AutoModelForCausalLM.from_pretrained(path / "policy")
    assert_same_weights(policy, reloaded)
    assert AutoTokenizer.from_pretrained(path / "policy")("w1 w2").input_ids == [1, 2]


def test_peft_checkpoint_is_adapter_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
        return get_peft_model(tiny_llama(tie=True, seed=0), config)  # same base weights each time

    model = lora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    path = save_checkpoint(tmp_path, 5, models={"policy": model})
    files = {p.name for p in (path / "policy").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files

    fresh = lora_model()
    load_checkpoint(path, models={"policy": fresh})
    assert_same_weights(model, fresh)


def test_sharded_hf_checkpoint_loads(tmp_path):
    policy = tiny_llama(tie=False, seed=0)
    path = save_checkpoint(tmp_path, 1, models={"policy": policy})
    (path / "policy" / "model.safetensors").unlink()
    policy.save_pretrained(path / "policy", max_shard_size="5KB")
    assert (path / "policy" / "model.safetensors.index.json").exists()
    fresh = tiny_llama(tie=False, seed=1)
    load_checkpoint(path, models={"policy": fresh}, restore_rng=False)
    assert_same_weights(policy, fresh)


def test_strict_weight_matching(tmp_path):
    path = save_checkpoint(tmp_path, 1, models={"critic": tiny_critic(0)})
    weights_file = path / "critic" / "model.safetensors"
    weights = load_file(weights_file)

    save_file({**weights, "extra.weight": torch.zeros(2)}, weights_file)
    with pytest.raises(CheckpointError, match=r"1 weight\(s\) in the checkpoint that the model doesn't have: \['extra.weight'\]"):
        load_checkpoint(path, models={"critic": tiny_critic(1)})

    save_file({k: v for k, v in weights.items() if k != "2.bias"}, weights_file)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['2.bias'\]"):
        load_checkpoint(path, models={"critic": tiny_critic(1)})

    save_file({**weights, "2.bias": torch.zeros(3)}, weights_file)
    with pytest.raises(CheckpointError, match=r"weight shapes differ \(checkpoint vs model\): \['2.bias: \(3,\) vs \(1,\)'\]"):
        load_checkpoint(path, models={"critic": tiny_critic(1)})

    with pytest.raises(CheckpointError, match="no model 'policy' in this checkpoint"):
        load_checkpoint(path, models={"policy": tiny_critic(1)})


def test_keep_last_pruning_and_resave(tmp_path):
    critic = tiny_critic(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, models={"critic": critic}, state={"v": step}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-000004", "step-000005"]
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash-"))]

    # Re-saving an existing step replaces it.
    save_checkpoint(tmp_path, 5, models={"critic": critic}, state={"v": "again"}, keep_last=2)
    assert load_checkpoint(latest_checkpoint(tmp_path), models={})["v"] == "again"

    for step in range(6, 9):
        save_checkpoint(tmp_path, step, models={"critic": critic}, keep_last=None)
    assert len([p for p in root.iterdir() if p.name.startswith("step-")]) == 5


def test_latest_checkpoint_skips_leftovers_and_incomplete_dirs(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 3, models={"critic": tiny_critic(0)})
    root = tmp_path / "checkpoints"
    (root / "step-000009").mkdir()  # no COMPLETE
    leftover = root / ".tmp-step-000010-deadbeef"
    leftover.mkdir()
    (leftover / "COMPLETE").write_text("even with the marker, a .tmp dir is never a checkpoint\n")
    assert latest_checkpoint(tmp_path) == root / "step-000003"
    assert not leftover.exists()  # cleaned up
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(root / "step-000009", models={})


def test_latest_checkpoint_leaves_a_running_save_alone(tmp_path):
    import fcntl

    save_checkpoint(tmp_path, 1, models={"critic": tiny_critic(0)})
    root = tmp_path / "checkpoints"
    in_flight = root / ".tmp-step-000002-0badcafe"
    in_flight.mkdir()
    # Another process is saving right now: it holds the lock, so its temporary directory must survive.
    fd = os.open(root / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert latest_checkpoint(tmp_path) == root / "step-000001"
        assert in_flight.exists()
    finally:
        os.close(fd)
    assert latest_checkpoint(tmp_path, clean=False) == root / "step-000001" and in_flight.exists()
    assert latest_checkpoint(tmp_path) == root / "step-000001" and not in_flight.exists()


def test_reading_a_clean_run_writes_nothing(tmp_path):
    # Every data-parallel rank looks for the latest checkpoint; ranks other than 0 must not write to the run.
    for step in (1, 2):
        save_checkpoint(tmp_path, step, models={"critic": tiny_critic(0)})
    root = tmp_path / "checkpoints"
    (root / ".lock").unlink()
    before = sorted(p.name for p in root.iterdir())
    assert latest_checkpoint(tmp_path) == root / "step-000002"
    assert complete_checkpoints(tmp_path) == [root / "step-000001", root / "step-000002"]
    assert sorted(p.name for p in root.iterdir()) == before


def test_crash_between_renames_of_a_resave_keeps_the_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path, 4, models={"critic": tiny_critic(0)}, keep_last=1)
    # What a kill between "move old copy aside" and "move new copy in" leaves behind:
    os.rename(path, path.parent / ".old-step-000004-0123abcd")
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path, models={"critic": tiny_critic(1)})["step"] == 4


def test_bad_arguments_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_checkpoint(tmp_path, 1, models={"critic": tiny_critic(0)}, state={"tensor": torch.zeros(1)})
    with pytest.raises(ValueError, match="folder name"):
        save_checkpoint(tmp_path, 1, models={"../evil": tiny_critic(0)})
    assert not (tmp_path / "checkpoints").exists()  # arguments are checked before anything is written


# A writer that saves a ~4 MB model plus AdamW state over and over; the weights of step s are all equal to s.
# Importing torch takes seconds here, so one "zygote" process imports it once and forks a fresh writer for each
# kill; the test SIGKILLs the forked writer, which is the process doing the saving.
WRITER = """
import os, sys, traceback
import torch
from tether.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

# Pay for torch's lazy imports (the first optimizer costs seconds) once, before forking. One thread, so there is no
# thread pool in the process being forked.
torch.set_num_threads(1)
warm = torch.nn.Linear(2, 2)
torch.optim.AdamW(warm.parameters()).step()

def write(run_dir):
    model = torch.nn.Linear(1024, 1024)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 1024)).sum().backward()
    optimizer.step()
    latest = latest_checkpoint(run_dir)  # what a resuming trainer does; also cleans the last kill's leftovers
    step = 0 if latest is None else load_checkpoint(latest, models={"critic": model})["step"]
    print("ready", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        for _ in range(2 if step % 3 == 0 else 1):  # some steps are saved twice, to crash re-saves too
            save_checkpoint(run_dir, step, models={"critic": model}, optimizers={"adamw": optimizer},
                            state={"fill": step}, keep_last=2)
        print(f"saved {step}", flush=True)

for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            write(sys.argv[1])
        except BaseException:
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        os._exit(1)
    print(f"writer {pid}", flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_never_loses_or_corrupts_a_checkpoint(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    zygote = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env,
    )
    last_reported = 0
    try:
        for kill in range(8):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            lines = [zygote.stdout.readline().strip()]
            assert lines[0].startswith("writer "), lines
            writer_pid = int(lines[0].split()[1])
            lines.append(zygote.stdout.readline().strip())
            assert lines[-1] == "ready", lines + zygote.stdout.readlines()
            if kill % 2 == 0:
                time.sleep(rng.uniform(0.0, 0.5))  # any moment at all
            else:
                # Right while a save is in flight: wait for a temporary directory to appear, and a little more.
                deadline = time.monotonic() + 10
                while not any(p.name.startswith(".tmp-") for p in root.iterdir()) and time.monotonic() < deadline:
                    time.sleep(0.0005)
                time.sleep(rng.uniform(0.0, 0.02))
            os.kill(writer_pid, signal.SIGKILL)
            while (line := zygote.stdout.readline().strip()) != "reaped":
                assert line, "the zygote died"
                lines.append(line)
            saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
            assert len(saved) == len(lines) - 2, lines  # nothing but "saved N" lines: no traceback
            last_reported = max([last_reported, *saved])

            latest = latest_checkpoint(tmp_path)
            if last_reported == 0 and latest is None:
                continue  # killed before the first save finished: nothing to check yet
            assert latest is not None
            model = torch.nn.Linear(1024, 1024)
            optimizer = torch.optim.AdamW(model.parameters())
            state = load_checkpoint(latest, models={"critic": model}, optimizers={"adamw": optimizer})
            step = state["step"]
            # Every save that returned is durable, and what's there is exactly what the writer meant for that step.
            assert step >= last_reported
            assert state["fill"] == step
            assert torch.all(model.weight == step) and torch.all(model.bias == step)
            assert optimizer.state_dict()["state"][0]["step"].item() == 1
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait()
    assert last_reported > 0, "the writer never completed a save; the test proved nothing"


def test_graceful_stop_on_sigterm_and_second_sigint(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary of the main thread
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_graceful_stop_outside_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker():
        with GracefulStop() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGTERM) is before))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(False, True)]


# --- damaged checkpoints and failed writes ----------------------------------------------------------------


def _three_checkpoints(tmp_path):
    policy, critic, optimizer, scheduler = make_trainer(True, seed=0)
    for step in (1, 2, 3):
        train_step(policy, critic, optimizer, scheduler)
        save_checkpoint(tmp_path, step, models={"policy": policy, "critic": critic}, optimizers={"main": optimizer},
                        keep_last=None)
    return policy, critic, optimizer


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("victim", ["policy/model.safetensors", "optimizers.pt", "both"])
def test_a_truncated_file_fails_verification_and_resume_takes_the_newest_good_one(tmp_path, victim):
    from tether.train.checkpoint import verify_checkpoint

    _three_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-000003"
    assert verify_checkpoint(newest) is None
    for name in (["policy/model.safetensors", "optimizers.pt"] if victim == "both" else [victim]):
        _truncate(newest / name)
    problem = verify_checkpoint(newest)
    assert "truncated or damaged" in problem and problem.split()[0] in ("policy/model.safetensors", "optimizers.pt")
    checkpoints = list(reversed(complete_checkpoints(tmp_path)))
    good = [p for p in checkpoints if verify_checkpoint(p) is None]
    bad = [(p, verify_checkpoint(p)) for p in checkpoints if verify_checkpoint(p) is not None]
    assert [p.name for p in good] == ["step-000002", "step-000001"] and [p.name for p, _ in bad] == ["step-000003"]


def test_same_size_damage_is_caught_by_the_hash(tmp_path):
    from tether.train.checkpoint import verify_checkpoint

    _three_checkpoints(tmp_path)
    target = tmp_path / "checkpoints" / "step-000003" / "optimizers.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(target.parent)
    assert verify_checkpoint(target.parent, hashes=False) is None  # sizes alone cannot see it


def test_loading_a_truncated_file_names_it(tmp_path):
    policy, critic, optimizer = _three_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-000003"
    _truncate(newest / "optimizers.pt")
    with pytest.raises(CheckpointError, match=r"optimizers\.pt: cannot be read, damaged or truncated"):
        load_checkpoint(newest, models={"policy": policy}, optimizers={"main": optimizer})
    _truncate(newest / "policy" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read, damaged or truncated"):
        load_checkpoint(newest, models={"policy": policy})


@pytest.mark.parametrize("cause", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")])
def test_a_failed_write_is_one_clear_error_and_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch, cause):
    from tether.train import checkpoint
    from tether.train.checkpoint import CheckpointWriteError, verify_checkpoint

    policy, critic, optimizer = _three_checkpoints(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizers.pt"):
            Path(f).write_bytes(b"x" * 10)  # a partial file, as a full disk leaves it
            raise cause
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(tmp_path, 4, models={"policy": policy}, optimizers={"main": optimizer}, keep_last=1)
    msg = str(e.value)
    assert "\n" not in msg and "could not write checkpoint" in msg and "step-000004" in msg
    assert "the disk is full" in msg and "MiB free there" in msg
    assert "earlier checkpoints intact: step-000001, step-000002, step-000003" in msg
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock")) == [
        "step-000001", "step-000002", "step-000003"]  # no temporary directory left, nothing pruned
    assert all(verify_checkpoint(root / n) is None for n in ("step-000001", "step-000002", "step-000003"))


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    policy = tiny_critic(0)
    for step, healthy in ((1, True), (2, True), (3, False), (4, False), (5, False)):
        save_checkpoint(tmp_path, step, models={"critic": policy}, state={"healthy": healthy}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000005"]


def test_rng_states_per_rank_and_a_rank_the_checkpoint_does_not_know(tmp_path):
    from tether.train.checkpoint import restore_rank_rng, rng_state

    torch.manual_seed(1)
    r0 = rng_state()
    torch.manual_seed(2)
    r1 = rng_state()
    path = save_checkpoint(tmp_path, 1, models={"critic": tiny_critic(0)}, rng_states=[r0, r1])
    for rank, seed in ((0, 1), (1, 2)):
        torch.manual_seed(99)
        assert restore_rank_rng(path, rank)
        torch.manual_seed(seed)
        want = torch.rand(3)
        restore_rank_rng(path, rank)
        assert torch.equal(torch.rand(3), want)
    assert not restore_rank_rng(path, 2)
