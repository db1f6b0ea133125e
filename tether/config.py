"""One typed config tree for a tether run.

Config is data. Resolution order, later wins:
    dataclass defaults  <-  algorithm preset (tether.algorithms)  <-  YAML file  <-  `key.sub=value` overrides.
Every field is documented here, in its `help`, and nowhere else; `tether config` prints them all.
Unknown keys are errors that suggest the nearest known key; invalid values name the field and the range.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tether.algorithms import PRESETS
from tether.core.advantages import ADVANTAGES
from tether.core.losses import POLICY_LOSSES


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type or a value out of range."""


def knob(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A documented field. Mutable defaults are copied per instance."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraConfig:
    r: int = knob(0, "LoRA rank; 0 trains the full model.", ge=0)
    alpha: float = knob(16.0, "LoRA scaling numerator (scale = alpha / r).", gt=0)
    dropout: float = knob(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list = knob(["q_proj", "k_proj", "v_proj", "o_proj"],
                                "Module names that get adapters (peft's target_modules); 'all-linear' for all.")


@dataclass
class ModelConfig:
    path: str | None = knob(None, "Policy: a hub name or local path of an AutoModelForCausalLM. Empty with a "
                                  "built-in task: the built-in tiny model is built and SFT-trained first.")
    ref_path: str | None = knob(None, "Reference policy path; default: a frozen copy of the initial policy.")
    critic_path: str | None = knob(None, "Critic backbone path; default: the policy's initial weights.")
    teacher_path: str | None = knob(None, "On-policy distillation: a teacher causal LM with the policy's tokenizer "
                                          "(path, hub name, .gguf or builtin:NAME) that scores every sampled "
                                          "token; its per-token reward is -algorithm.distill_coef x the reverse "
                                          "KL estimate log pi - log pi_teacher.")
    trust_remote_code: bool = knob(False, "Allow model repositories to run their own Python code. Off: only "
                                          "turn on for code you have read.")
    dtype: str = knob("float32", "Dtype of the policy's weights. bfloat16 alone trains the bf16 weights directly "
                                 "(small updates round away); add model.master_weights=true for fp32 masters.",
                      choices=("float32", "bfloat16", "float16"))
    autocast: str | None = knob(None, "Run forward passes under autocast in this dtype (e.g. bfloat16); "
                                      "log-prob math stays float32.", choices=(None, "bfloat16", "float16"))
    frozen_dtype: str = knob("auto", "Dtype of frozen models (reference, reward model). auto: model.autocast's "
                                     "dtype if set (their passes run in it anyway; half the memory, no casts), "
                                     "else model.dtype.",
                             choices=("auto", "float32", "bfloat16", "float16"))
    master_weights: bool = knob(False, "With model.dtype=bfloat16/float16: the model computes (forward, backward, "
                                        "sampling) in that dtype while AdamW steps float32 master copies, with "
                                        "gradients accumulated in float32 (classic mixed precision; faster and "
                                        "smaller than model.autocast on CPU). One process only for now.")
    compile: bool = knob(False, "torch.compile the policy for its training and pi_old forwards (dynamic shapes: "
                                 "no recompile as completion lengths change): element-wise work fused, about a "
                                 "fifth off the update (47M model, bf16, CPU), after a first compile of 0.5-1.5 "
                                 "minutes. For long runs; one process for now.")
    gradient_checkpointing: bool = knob(False, "Recompute activations in the backward pass to save memory.")
    chat_template: bool = knob(False, "Wrap each prompt as a user turn with the tokenizer's chat template (a "
                                      "prompt may also be a list of chat messages: a conversation so far).")
    system_prompt: str | None = knob(None, "With model.chat_template: the system message of every prompt, in "
                                           "place of the conversation's own or the template's default; '' "
                                           "leaves an empty one. None: as the data and the template have it.")
    disable_dropout: bool = knob(True, "Set every dropout probability to 0 so that pi_old == pi_theta at the "
                                       "first minibatch (standard in RL fine-tuning).")
    batch_invariant: bool = knob(False, "Float32 forwards whose numbers do not depend on the batch, its padding or "
                                        "the KV cache: linear layers and attention sum exact products in float64 "
                                        "and round once (core/batch_invariant.py), in the sampler and the trainer "
                                        "alike, so that the sampler's log-probs are the trainer's bit for bit "
                                        "(rollout/logprob_mismatch_max = 0). About twice the forward time on CPU, "
                                        "and a float64 copy of the weights while sampling. HF backend, float32, "
                                        "without autocast or compile.")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters on the policy."})

    def frozen_dtype_name(self) -> str:
        """`frozen_dtype` with auto resolved."""
        if self.frozen_dtype != "auto":
            return self.frozen_dtype
        return self.autocast or self.dtype


@dataclass
class RolloutConfig:
    backend: str = knob("hf", "Generation backend: HF generate, vLLM colocated with the trainer (GPU, optional "
                              "extra), or a separate `vllm serve` at rollout.vllm_server_url (vllm-server).",
                        choices=("hf", "vllm", "vllm-server"))
    prompts_per_step: int = knob(8, "Prompts drawn per step.", ge=1)
    group_size: int = knob(4, "Completions sampled per prompt (G).", ge=1)
    max_new_tokens: int = knob(16, "Maximum completion length in tokens.", ge=1)
    temperature: float = knob(1.0, "Sampling temperature; log-probs are of logits / temperature.", gt=0)
    top_p: float = knob(1.0, "Nucleus sampling mass (1.0 = off).", gt=0, le=1)
    top_k: int = knob(0, "Top-k sampling (0 = off).", ge=0)
    stop_strings: list = knob([], "Extra strings that end a completion (EOS always does).")
    max_prompt_tokens: int | None = knob(None, "Longest prompt allowed; default: context window - max_new_tokens.")
    micro_batch_size: int = knob(64, "Sequences per generate call.", ge=1)
    weights_dtype: str = knob("auto", "Weights the HF sampler runs on: 'policy' (the policy itself, under "
                                      "model.autocast if set), or a copy of the policy in this dtype, refreshed "
                                      "after every optimiser step (bfloat16: +2 bytes per parameter, ~25% faster "
                                      "sampling on CPU than autocast). auto: bfloat16 when model.autocast=bfloat16 "
                                      "without FSDP, else policy.",
                              choices=("auto", "policy", "float32", "bfloat16", "float16"))
    compile: bool = knob(False, "HF backend: torch.compile the model's forward while it samples (dynamic shapes; "
                                "the per-token element-wise work fused). Costs a first compile of about half a "
                                "minute; for long runs.")
    decode_attention: str = knob("auto", "HF backend, CPU: attention of each one-token decode step of a model on "
                                         "SDPA. 'matmul': q.k and p.v as small matmuls, float32 softmax (a third "
                                         "off sampling where SDPA's CPU flash kernel is slow at one query token); "
                                         "'model': the model's own attention; auto: matmul unless the CPU has "
                                         "AMX.", choices=("auto", "matmul", "model"))
    packed_linears: bool = knob(True, "HF backend, CPU: run the linear layers on weights packed into oneDNN's "
                                      "blocked layout once per generate call, instead of re-laid-out at every "
                                      "matmul (47M model on CPU: a tenth off sampling in bf16 in the trainer, up to "
                                      "a third standalone in float32). Holds a copy of the linear weights while "
                                      "sampling. Off under autocast and rollout.compile.")
    inverse_cdf_sampling: bool = knob(True, "HF backend, CPU: draw each token by inverse transform sampling "
                                            "(one uniform per row over float64 cumulative sums) instead of "
                                            "torch.multinomial's exponential race (one random draw per vocabulary "
                                            "entry): the same distribution, exactly; 54 -> 3 ms per decode step at "
                                            "32 rows x 49k tokens. Off: torch's own sampling and random stream.")
    logprob_tolerance: float = knob(1e-3, "Max |sampler - trainer| log-prob gap tolerated before a warning.",
                                    gt=0)
    max_staleness: int = knob(0, "Asynchronous rollouts: a worker process samples the next batches from a policy "
                                 "at most this many updates old while the trainer updates (pi_old is the trainer's "
                                 "pre-update policy, algorithm.tis_cap weights the behaviour/proximal gap); "
                                 "with env.name it runs whole episodes. 0: the synchronous loop.", ge=0)
    async_threads: int = knob(1, "Asynchronous rollouts: CPU threads of the generation worker (the trainer "
                                 "keeps `threads`).", ge=1)
    vllm_gpu_memory_utilization: float = knob(0.3, "vLLM backend: share of GPU memory for its KV cache.",
                                              gt=0, le=1)
    vllm_sleep: bool = knob(False, "vLLM backend: sleep mode around the update (vLLM's weights to host memory "
                                   "and its KV cache freed while the trainer steps; woken for the weight sync).")
    vllm_sync_bucket_mb: float = knob(256.0, "vLLM backends: weights pushed after each update in calls of at "
                                             "most this many MiB (one call per parameter is slow for large "
                                             "models).", gt=0)
    vllm_server_url: str = knob("http://localhost:8000", "vllm-server backend: the `vllm serve` server to sample "
                                                         "from (started as rollout/vllm_server.py says).")
    vllm_server_timeout: float = knob(600.0, "vllm-server backend: seconds one request (a batch's generation, a "
                                             "weight bucket) may take before the run stops with an error.", gt=0)


@dataclass
class AlgorithmConfig:
    name: str = knob("grpo", "Preset the other fields start from (tether/algorithms.py).", choices=tuple(PRESETS))
    advantage: str = knob("grpo", "Advantage estimator (tether.core.advantages.ADVANTAGES).",
                          choices=tuple(ADVANTAGES))
    std_scale: str = knob("group", "Divide outcome advantages by the group or batch std of scores.",
                          choices=("none", "group", "batch"))
    whiten_advantages: bool = knob(False, "Whiten advantages over the batch's completion tokens.")
    policy_loss: str = knob("clipped", "Policy loss (tether.core.losses.POLICY_LOSSES).",
                            choices=tuple(POLICY_LOSSES))
    eps_low: float = knob(0.2, "Clip range below 1 for the ratio.", gt=0, lt=1)
    eps_high: float = knob(0.2, "Clip range above 1 for the ratio.", gt=0)
    dual_clip: float | None = knob(None, "Dual-clip bound c > 1 for negative advantages (None = off).", gt=1)
    tau_pos: float = knob(1.0, "SAPO: the gate's temperature for positive advantages.", gt=0)
    tau_neg: float = knob(1.05, "SAPO: the gate's temperature for negative advantages (above tau_pos: "
                                "negative updates are damped sooner).", gt=0)
    aggregation: str = knob("seq_mean_token_mean", "How per-token losses become one number "
                            "(tether.core.losses.AGGREGATIONS).",
                            choices=("seq_mean_token_mean", "token_mean", "seq_mean_token_sum",
                                     "seq_mean_token_sum_norm"))
    kl_mode: str = knob("loss", "Where the KL to the reference enters: per-token reward, the loss, or nowhere.",
                        choices=("reward", "loss", "none"))
    kl_estimator: str = knob("k3", "KL estimator: sampled k1 (log-ratio), k2 (half squared), k3 (Schulman), or "
                                   "full, the exact KL of the next-token distributions at each position (the "
                                   "reference runs inside each training micro-batch; no variance from the "
                                   "sampled token).", choices=("k1", "k2", "k3", "full"))
    beta: float = knob(0.04, "KL coefficient (initial value when adaptive).", ge=0)
    kl_target: float | None = knob(None, "Target KL per token; set it to adapt beta (Ziegler et al.).", gt=0)
    kl_horizon: int = knob(10000, "Adaptive beta horizon, in sequences.", ge=1)
    gamma: float = knob(1.0, "GAE discount.", ge=0, le=1)
    lam: float = knob(0.95, "GAE lambda.", ge=0, le=1)
    value_coef: float = knob(0.5, "Value-loss coefficient c_v (needs a critic).", ge=0)
    value_clip: float | None = knob(0.2, "Clip value predictions around the old values (None = off).", gt=0)
    entropy_coef: float = knob(0.0, "Entropy bonus coefficient c_ent.", ge=0)
    epochs: int = knob(1, "Passes (K) over each batch.", ge=1)
    minibatches: int = knob(1, "Optimiser steps (M) per epoch; must divide the batch.", ge=1)
    target_approx_kl: float | None = knob(None, "Stop the epochs early when approx KL(old, new) passes this.",
                                          gt=0)
    filter_groups: bool = knob(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and "
                                      "refill from new prompts.")
    max_filter_rounds: int = knob(3, "Extra generation rounds allowed to refill filtered groups.", ge=0)
    overlong_buffer: int | None = knob(None, "DAPO soft overlong punishment: over the last L_cache tokens of "
                                             "rollout.max_new_tokens a completion's score falls linearly, to "
                                             "-overlong_penalty at the budget (None = off; DAPO used L_cache = "
                                             "L_max / 5).", ge=1)
    overlong_penalty: float = knob(1.0, "The soft overlong punishment at the budget (DAPO: 1.0).", ge=0)
    overlong_filter: bool = knob(False, "DAPO overlong filtering: completions cut at rollout.max_new_tokens "
                                        "carry no loss (they still count in their group's baseline).")
    entropy_top_fraction: float | None = knob(None, "Only the top fraction rho of the batch's completion tokens "
                                                    "by pi_old's entropy carry the policy gradient (Wang et al. "
                                                    "2025: rho = 0.2); KL and entropy terms keep every token. "
                                                    "None = off.", gt=0, le=1)
    distill_coef: float = knob(1.0, "Weight of the per-token distillation reward (with model.teacher_path).", ge=0)
    distill_estimator: str = knob("k1", "Reverse KL to the teacher: k1, the sampled log pi_old - log pi_teacher "
                                        "as a per-token reward; or full, the exact KL(pi || pi_teacher) of the "
                                        "next-token distributions as a loss term (x distill_coef, with its exact "
                                        "gradient; the teacher runs inside each training micro-batch).",
                                  choices=("k1", "full"))
    use_critic: bool = knob(False, "Train a value head (needed by the gae estimator).")
    critic: str = knob("separate", "separate: the critic is a second transformer (model.critic_path, default the "
                                   "policy's initial weights) with a value head. shared: a value head on the "
                                   "policy's own last hidden states; one forward and backward serve both losses "
                                   "and the value loss (x value_coef) also trains the policy's trunk (PPO at "
                                   "close to GRPO's cost).", choices=("separate", "shared"))
    tis_cap: float | None = knob(None, "Truncated importance sampling: weight each token by min(pi_old / "
                                       "pi_sampler, cap) to correct sampler/trainer mismatch.", gt=0)


@dataclass
class OptimConfig:
    lr: float = knob(1e-5, "Policy learning rate (AdamW).", gt=0)
    critic_lr: float = knob(1e-5, "Critic learning rate (AdamW).", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay.", ge=0)
    betas: list = knob([0.9, 0.999], "AdamW betas.")
    adam_eps: float = knob(1e-8, "AdamW epsilon in the denominator sqrt(v) + eps. It bounds how much a "
                                 "gradient near 0 (float noise, say) can move a weight: by up to lr * g / eps.",
                           gt=0)
    max_grad_norm: float | None = knob(1.0, "Gradient-norm clip (None = off).", gt=0)
    schedule: str = knob("constant", "Learning-rate schedule after warm-up.",
                         choices=("constant", "linear", "cosine"))
    warmup_steps: int = knob(0, "Optimiser steps of linear warm-up.", ge=0)
    micro_batch_size: int = knob(32, "Sequences per forward/backward (gradient accumulation inside a "
                                     "minibatch).", ge=1)
    token_budget: int | None = knob(None, "If set, micro-batches are formed by padded-token budget instead of "
                                          "a fixed count (sequences sorted by length).", ge=1)
    no_grad_micro_batch_size: int | None = knob(None, "Sequences per forward of the reference and of a separate "
                                                      "critic's old values (no activations are kept, so it can "
                                                      "exceed micro_batch_size); default: micro_batch_size. The "
                                                      "pi_old pass always follows the training micro-batches.",
                                                ge=1)
    share_prompts: bool = knob(True, "Rows that share a prompt (a group's completions) run the prompt once and "
                                     "read its KV cache, in sampling's prefill and in every policy and reference "
                                     "pass: the same log-probs and gradients up to float order, for G x fewer "
                                     "prompt positions. The passes do not share under gradient checkpointing.")
    max_bad_steps: int = knob(3, "Consecutive non-finite steps tolerated before the run stops.", ge=1)
    max_weight_growth: float = knob(4.0, "A step that changes a model's weight norm by more than this factor "
                                         "(up or down) is an unstable update: a warning, and from then on the "
                                         "run's checkpoints are marked unhealthy, so that pruning keeps the last "
                                         "healthy one.", gt=1)


@dataclass
class RewardConfig:
    functions: list = knob([], "Reward functions: entries 'module:function', 'path.py:function', "
                               "'builtin:name', or {spec: ..., weight: 1.0, kwargs: {...}} (kwargs build a "
                               "factory such as builtin:format).")
    task_reward: bool = knob(True, "With data.source=task:NAME, score with the task's own verifiable reward too.")
    reward_model: str | None = knob(None, "Path of an AutoModelForSequenceClassification reward model.")
    reward_model_weight: float = knob(1.0, "Weight of the reward model's score.")
    reward_model_batch_size: int = knob(16, "Reward-model micro-batch.", ge=1)
    normalize: bool = knob(False, "Running normalisation of reward-model scores.")
    clip: float | None = knob(None, "Clip reward-model scores to [-clip, clip].", gt=0)
    on_error: str = knob("raise", "A reward function that fails: stop with an error, or score the sample "
                                  "None and count it.", choices=("raise", "none"))
    timeout_s: float | None = knob(None, "Per-call timeout of a reward function.", gt=0)
    conversation: bool = knob(False, "Also give reward functions a `conversation` column: each sample's prompt "
                                     "messages (the system prompt as sampled) and the completion as the "
                                     "assistant's turn.")


@dataclass
class DataConfig:
    source: str | None = knob(None, "Prompts: a .jsonl/.json/.csv/.parquet file, a dataset saved with "
                                    "datasets, or 'task:NAME' for a built-in task.")
    prompt_column: str = knob("prompt", "Column holding the prompt; other columns go to reward functions.")
    on_bad_row: str = knob("skip", "Malformed rows: skip them (counted, logged) or stop.",
                           choices=("skip", "error"))
    shuffle: bool = knob(True, "Shuffle prompts each epoch.")


@dataclass
class TaskConfig:
    name: str | None = knob(None, "Built-in task (tether.tasks.TASKS) for the default pipeline and eval.")
    train_size: int = knob(20000, "Training prompts generated for a built-in task.", ge=1)
    eval_size: int = knob(200, "Held-out prompts for greedy evaluation.", ge=1)
    options: dict = knob({}, "Task options (e.g. digits, partial_credit).")
    sft: bool = knob(True, "Pipeline: SFT the built tiny model on the task's demonstrations first.")
    sft_steps: int | None = knob(None, "Pipeline: SFT steps (default: the task's tuned budget).", ge=1)
    model_size: dict = knob({}, "Pipeline: tiny-model shape overrides (hidden_size, num_layers, num_heads).")


@dataclass
class LoggingConfig:
    run_dir: str | None = knob(None, "Run directory; default runs/<time>-<algorithm>.")
    log_every: int = knob(1, "Steps between progress lines (metrics.jsonl gets every step).", ge=1)
    samples_every: int = knob(10, "Steps between writes to samples.jsonl.", ge=1)
    samples_per_step: int = knob(4, "Completions written to samples.jsonl each time.", ge=0)
    eval_every: int | None = knob(None, "Steps between greedy evaluations on a task (None = start/end only).",
                                  ge=1)
    tensorboard: bool = knob(True, "Write TensorBoard event files.")
    wandb: bool = knob(False, "Log to Weights & Biases (needs `pip install wandb`).")
    wandb_project: str | None = knob(None, "W&B project.")
    report: bool = knob(True, "Write report.html at the end.")
    progress: bool = knob(True, "Show a live progress bar.")
    overwrite: bool = knob(False, "Start a new run in a logging.run_dir that already holds one, deleting its "
                                  "checkpoints and logs first (`tether train --overwrite`). Without it, such a "
                                  "directory is refused unless the run resumes.")


@dataclass
class CheckpointConfig:
    every: int | None = knob(None, "Steps between checkpoints (None = only at the end).", ge=1)
    keep_last: int = knob(2, "Complete checkpoints kept.", ge=1)
    resume: str | None = knob(None, "'latest' (what `tether train --resume` sets): continue from the newest "
                                    "checkpoint of the run that verifies, an error if there is none; 'auto': the "
                                    "same, or start fresh (said in the log) when there is no checkpoint; or a "
                                    "checkpoint path. Without logging.run_dir, both look for the newest run of "
                                    "the same config under runs/. None: start a new run, refused when "
                                    "logging.run_dir already holds one (see logging.overwrite).")
    save_final: bool = knob(True, "Save a checkpoint after the last step.")
    on_write_error: str = knob("stop", "A checkpoint that cannot be written (disk full, permissions): 'stop' the "
                                       "run with an error naming the path and the cause, or 'continue' training "
                                       "without that checkpoint (a warning).", choices=("stop", "continue"))


@dataclass
class EnvConfig:
    name: str | None = knob(None, "Multi-turn episodes against an environment (tether/envs/): a built-in name "
                            "(tether.envs.ENVIRONMENTS), 'module:Class' or 'path.py:Class'; one object per "
                            "episode. None: single completions.")
    options: dict = knob({}, "Keyword arguments of every environment's construction.")
    max_turns: int = knob(4, "Model turns per episode at most; an episode still going then ends, flagged.", ge=1)
    max_tokens: int = knob(256, "Tokens per episode after the opening prompt (model and environment turns); each "
                           "model turn samples up to rollout.max_new_tokens of them.", ge=1)
    on_error: str = knob("raise", "An environment that raises: stop with an error naming it and the episode, "
                         "or end that episode unscored and count it (episode/env_failed_frac).",
                         choices=("raise", "skip"))


@dataclass
class DistributedConfig:
    strategy: str = knob("ddp", "With several ranks: replicate (DDP) or shard (FSDP2) the trained models.",
                         choices=("ddp", "fsdp"))
    backend: str | None = knob(None, "torch.distributed backend; default nccl on GPU, gloo on CPU.")


@dataclass
class TrainConfig:
    seed: int = knob(0, "Seed for every random draw (torch, python, data order, sampling).")
    steps: int = knob(100, "Training steps (one batch of rollouts each).", ge=1)
    device: str = knob("auto", "cpu, cuda, cuda:N, or auto.")
    threads: str | None = knob("auto", "CPU threads for torch: 'auto' uses the cores other processes leave idle, "
                                       "re-measured between steps (two threads beside a busy process ran a "
                                       "small-model step 10x slower than one); an integer fixes the count, and "
                                       "with it the float order of reductions; None: torch's default.")
    keep_freed_memory: bool = knob(True, "Have glibc's malloc keep freed host memory for reuse (mmap threshold "
                                   "32 MiB, no trimming) instead of page-faulting it back every step: about -10% "
                                   "CPU step time at equal peak RSS; RSS stays at its peak. The first step's "
                                   "one-off garbage (compilation) is handed back once after it. Process-wide.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Models."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "Sampling."})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata={"help": "The algorithm."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimisation."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Rewards."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompts."})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "Built-in task."})
    env: EnvConfig = field(default_factory=EnvConfig, metadata={"help": "Multi-turn environments."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Logs and report."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints."})
    distributed: DistributedConfig = field(default_factory=DistributedConfig,
                                           metadata={"help": "Multi-process training."})


# ----------------------------------------------------------------------------------------------------------
# Building a config from dicts, YAML and overrides


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise a ConfigError that names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _check_range(value: Any, meta: dict, key: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {shown}.{hint}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for name, sym, ok in bounds:
        b = meta.get(name)
        if b is not None and not ok(value, b):
            allowed = " and ".join(f"{s} {meta[n]}" for n, s, _ in bounds if meta.get(n) is not None)
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {allowed}.")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        known = ", ".join(fields)
        raise ConfigError(f"unknown config key '{prefix}{key}'.{hint} Known keys here: {known}.")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        tp = types[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key + ".")
        else:
            value = _coerce(data[name], tp, key)
            _check_range(value, f.metadata, key)
            kwargs[name] = value
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=c` strings into a nested dict; values are parsed as YAML scalars (so 1e-5, true, null work)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def resolve_config(raw: dict | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults <- preset <- raw (e.g. YAML) <- overrides, validated."""
    from tether.algorithms import preset_dict  # noqa: PLC0415

    merged = dict(raw or {})
    if overrides:
        merged = deep_merge(merged, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    name = (merged.get("algorithm") or {}).get("name", AlgorithmConfig.name)
    try:
        preset = preset_dict(name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    cfg = _build(TrainConfig, deep_merge(deep_merge(preset, task_layer(merged)), merged))
    validate(cfg)
    return cfg


def task_layer(merged: dict) -> dict:
    """The partial config a built-in multi-turn task brings (tether/tasks/episodic.py): its environment as
    env.name and the episode budgets it was tuned with; below the user's own values. Empty for other tasks."""
    from tether.tasks import TASKS  # noqa: PLC0415

    task = merged.get("task") or {}
    source = str((merged.get("data") or {}).get("source") or "")
    name = task.get("name") or (source[len("task:"):] if source.startswith("task:") else None)
    factory = TASKS.get(name) if isinstance(name, str) else None
    env_name = getattr(factory, "environment", "")
    if not env_name:
        return {}
    return deep_merge({"env": {"name": env_name}}, getattr(factory, "env_defaults", {}))


def validate(cfg: TrainConfig) -> None:
    """Checks that involve several fields."""
    a, r = cfg.algorithm, cfg.rollout
    if a.advantage in ("grpo", "rloo") and r.group_size < 2:
        raise ConfigError(f"algorithm.advantage={a.advantage!r} is a group baseline and needs "
                          f"rollout.group_size >= 2 (got {r.group_size}).")
    if a.std_scale == "group" and a.advantage != "gae" and r.group_size < 2:
        raise ConfigError("algorithm.std_scale='group' divides by the group's std and needs "
                          f"rollout.group_size >= 2 (got {r.group_size}).")
    batch = r.prompts_per_step * r.group_size
    if batch % a.minibatches:
        raise ConfigError(f"algorithm.minibatches={a.minibatches} does not divide the batch of "
                          f"{batch} sequences (rollout.prompts_per_step x rollout.group_size).")
    if a.advantage == "gae" and not a.use_critic:
        raise ConfigError("algorithm.advantage='gae' needs a critic: set algorithm.use_critic=true.")
    if a.kl_target is not None and a.kl_mode == "none":
        raise ConfigError("algorithm.kl_target is set but algorithm.kl_mode='none'.")
    m = cfg.model
    if m.master_weights and m.dtype == "float32":
        raise ConfigError("model.master_weights=true keeps float32 masters of low-precision weights: set "
                          "model.dtype=bfloat16 (or float16) with it.")
    if m.master_weights and m.autocast:
        raise ConfigError("model.master_weights=true already computes in model.dtype: drop model.autocast.")
    if m.batch_invariant:
        clashes = [what for what, on in (
            (f"model.dtype={m.dtype}", m.dtype != "float32"), (f"model.autocast={m.autocast}", m.autocast),
            (f"rollout.backend={r.backend}", r.backend != "hf"),
            (f"rollout.weights_dtype={r.weights_dtype}", r.weights_dtype in ("bfloat16", "float16")),
            ("model.compile", m.compile), ("rollout.compile", r.compile),
            ("rollout.decode_attention=matmul", r.decode_attention == "matmul")) if on]
        if clashes:
            raise ConfigError("model.batch_invariant makes the HF sampler's and the trainer's float32 forwards "
                              f"equal bit for bit; it does not work with {', '.join(clashes)}")
    if cfg.threads is not None and cfg.threads != "auto" and not (cfg.threads.isdigit() and int(cfg.threads) > 0):
        raise ConfigError(f"threads: {cfg.threads!r} is not allowed; give 'auto', a positive integer, or null.")
    if cfg.env.name is not None and r.backend != "hf":
        raise ConfigError(f"env.name={cfg.env.name!r}: episodes are sampled with rollout.backend=hf for now "
                          f"(got {r.backend!r})")
    if r.backend == "vllm-server" and r.vllm_sleep:
        raise ConfigError("rollout.vllm_sleep frees a colocated vLLM's memory for the update; a vllm-server "
                          "samples on GPUs of its own: drop rollout.vllm_sleep (or use rollout.backend=vllm)")
    if cfg.env.name is not None and r.stop_strings:
        raise ConfigError("env.name with rollout.stop_strings: a model turn ends at its end-of-turn token; "
                          "drop rollout.stop_strings")
    if a.eps_high < a.eps_low and a.name == "dapo":
        raise ConfigError("dapo expects algorithm.eps_high >= algorithm.eps_low.")
    if a.name == "opd" and cfg.model.teacher_path is None:
        raise ConfigError("algorithm.name=opd distils a teacher into the policy: set model.teacher_path")
    if a.kl_estimator == "full" and a.kl_mode == "loss" and a.distill_estimator == "full" and cfg.model.teacher_path:
        raise ConfigError("algorithm.kl_estimator=full (in the loss) and distill_estimator=full would run two "
                          "extra models in every micro-batch: pick one of them, or put the KL in the reward")
    if r.top_k == 1:
        raise ConfigError("rollout.top_k=1 samples greedily: the policy that samples is deterministic, so every "
                          "log-prob is 0 and there is no policy gradient; use top_k=0 (off) or top_k > 1")
    if a.kl_estimator == "full" and (r.top_k > 0 or r.top_p < 1.0):
        raise ConfigError("algorithm.kl_estimator=full is the KL of the whole softmax; with rollout.top_k / "
                          "top_p the policy samples from a truncated one: use k1/k2/k3 there (they are exact "
                          "for the truncated policy)")
    if r.max_staleness > 0:
        if r.backend == "vllm":
            raise ConfigError(f"rollout.max_staleness={r.max_staleness} (asynchronous rollouts) does not work with "
                              "a colocated vLLM (rollout.backend=vllm), which shares the trainer's GPU: use "
                              "rollout.backend=vllm-server, or rollout.max_staleness=0")
    if a.overlong_buffer is not None and a.overlong_buffer > r.max_new_tokens:
        raise ConfigError(f"algorithm.overlong_buffer={a.overlong_buffer} is longer than the length budget "
                          f"rollout.max_new_tokens={r.max_new_tokens}: it must fit inside it (DAPO: a fifth).")
    if cfg.env.name is not None and (a.overlong_buffer is not None or a.overlong_filter):
        raise ConfigError("algorithm.overlong_buffer / overlong_filter act on single completions against "
                          "rollout.max_new_tokens; an episode's budget is env.max_tokens and its cut episodes are "
                          "flagged (episode/token_limit_frac): drop them with env.name")


def validate_for_world(cfg: TrainConfig, world_size: int) -> None:
    """The checks that depend on how many data-parallel ranks run: called by the Trainer before any model
    is loaded, so that every config error comes before the first (slow) load."""
    a, r, m = cfg.algorithm, cfg.rollout, cfg.model
    fsdp = world_size > 1 and cfg.distributed.strategy == "fsdp"
    if fsdp and r.weights_dtype not in ("auto", "policy"):
        raise ConfigError(f"rollout.weights_dtype={r.weights_dtype} keeps a whole copy of the policy, which "
                          "FSDP shards: use rollout.weights_dtype=policy with distributed.strategy=fsdp")
    if world_size == 1:
        return
    if r.max_staleness > 0 and fsdp:
        raise ConfigError("rollout.max_staleness > 0 (asynchronous rollouts) gives each rank's generation worker "
                          "a whole copy of the policy, which FSDP shards: use distributed.strategy=ddp with it")
    if r.backend == "vllm-server":
        raise ConfigError("rollout.backend=vllm-server trains on one process for now (one weight-transfer group "
                          "per server); scale the server's generation with its own tensor parallelism")
    if m.master_weights:
        raise ConfigError("model.master_weights=true runs on one process for now: use model.autocast="
                          "bfloat16 with several ranks")
    if m.compile:
        raise ConfigError("model.compile=true runs on one process for now")
    if fsdp and a.use_critic and a.critic == "shared":
        raise ConfigError("algorithm.critic=shared is not supported with distributed.strategy=fsdp yet: use "
                          "ddp, or algorithm.critic=separate")
    if r.prompts_per_step % world_size:
        raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} cannot be split evenly over "
                          f"{world_size} ranks: make it a multiple of {world_size}.")
    rows = r.prompts_per_step // world_size * r.group_size
    if rows % a.minibatches:
        raise ConfigError(f"with {world_size} ranks each rank holds {rows} sequences per step "
                          f"(prompts_per_step / ranks x group_size), which algorithm.minibatches="
                          f"{a.minibatches} does not divide: every rank must hold an equal share of "
                          "every minibatch.")
    if a.filter_groups:
        raise ConfigError("algorithm.filter_groups (dynamic sampling) keeps a different number of groups "
                          "on each rank and is not supported with several ranks yet; run it on one rank.")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: the one place every knob is documented."""
    rows = []
    types = _field_types(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if _is_section(types[f.name]):
            rows += describe(types[f.name], key + ".")
        else:
            extra = ""
            if f.metadata.get("choices"):
                extra = " Choices: " + ", ".join(str(c) for c in f.metadata["choices"]) + "."
            rows.append((key, json.dumps(getattr(default, f.name)), f.metadata.get("help", "") + extra))
    return rows
