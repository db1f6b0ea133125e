#!/usr/bin/env bash
# The full RLHF pipeline from the command line, on the tiny local model (a minute or two on 2 CPU cores):
# SFT -> reward model (Bradley-Terry on the built-in preference task) -> PPO against it with an adaptive KL.
set -euo pipefail
out=${1:-runs/rlhf-tiny}
mkdir -p "$out"
python -c "from tether.tasks.tiny_model import build_tiny_model as b; b('$out/base', hidden_size=64, num_layers=2)"
tether sft --model "$out/base" --data task:arithmetic --out "$out/sft" --steps 60 --lr 3e-3 --batch-size 64 --n 5000
tether reward-model --model "$out/sft" --data builtin:preference --out "$out/rm" --n 1000 --epochs 2 --lr 1e-3
tether train model.path="$out/sft" data.source=task:arithmetic reward.task_reward=false reward.reward_model="$out/rm" \
  algorithm.name=ppo algorithm.beta=0.1 algorithm.kl_target=0.05 algorithm.kl_horizon=200 \
  rollout.max_new_tokens=6 rollout.prompts_per_step=16 rollout.group_size=2 \
  optim.lr=1.5e-4 optim.critic_lr=1e-3 steps=40 logging.run_dir="$out/ppo"
