#!/usr/bin/env bash
# Reproduce docs/results.md: every online recipe and offline DPO on the sentiment task,
# from the embedded SmolLM2-135M-Instruct with the task's gold judge (VADER) as the
# reward, each evaluated against the starting model on all 64 held-out prompts with
# 4 samples each; and the HH-RLHF reward-model benchmark.
#
#   scripts/results.sh                       # every row (about 2 hours on 2 shared cores)
#   scripts/results.sh grpo rloo             # some rows; names: see ROWS below
#   scripts/results.sh table                 # the markdown table from the eval JSONs
#
# One thread per process (OMP_NUM_THREADS=1); on 2 cores run two invocations at once.
# Outputs: runs/results/NAME (the policy) and runs/results/eval-NAME.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PYTHON:-python}"
AK=("$PY" -m alignkit.cli)
OUT=runs/results
mkdir -p "$OUT"
ROWS=(ppo rloo grpo reinforce_pp bon rsft online_dpo dpg brain dpo hh_reward)
# the same reference samples (seed 0) for every row
EVAL=(eval --task sentiment --reference smollm2-135m-instruct --samples-per-prompt 4
      --max-new-tokens 32 --temperature 1.0)

row() {
    local name="$1"
    case "$name" in
    ppo) "${AK[@]}" ppo lr=3e-5 lr_schedule=constant temperature=1.0 max_steps=12 \
            eval_prompts=0 output_dir="$OUT/ppo" ;;
    rloo) "${AK[@]}" rl algo=rloo lr=2e-5 lr_schedule=constant max_steps=12 \
            eval_prompts=0 output_dir="$OUT/rloo" ;;
    grpo) "${AK[@]}" rl algo=grpo lr=2e-5 lr_schedule=constant kl_coef=0.04 max_steps=12 \
            eval_prompts=0 output_dir="$OUT/grpo" ;;
    reinforce_pp) "${AK[@]}" rl algo=reinforce_pp lr=2e-5 lr_schedule=constant max_steps=12 \
            eval_prompts=0 output_dir="$OUT/reinforce_pp" ;;
    bon)  # four best-of-8 runs with different seeds = 4 samples per prompt
        for seed in 0 1 2 3; do
            "${AK[@]}" bon n=8 max_prompts=64 seed="$seed" output_dir="$OUT/bon-seed$seed"
        done
        "${AK[@]}" "${EVAL[@]}" --output "$OUT/eval-bon.json" --completions \
            "bon=$OUT/bon-seed0/best_of_n.jsonl,$OUT/bon-seed1/best_of_n.jsonl,$OUT/bon-seed2/best_of_n.jsonl,$OUT/bon-seed3/best_of_n.jsonl"
        return ;;
    rsft) "${AK[@]}" rsft lr=2e-5 eval_prompts=0 output_dir="$OUT/rsft" ;;
    online_dpo) "${AK[@]}" online-dpo eval_prompts=0 output_dir="$OUT/online_dpo" ;;
    dpg) "${AK[@]}" dm algo=dpg lr=2e-5 max_steps=8 updates_per_batch=4 eval_prompts=0 output_dir="$OUT/dpg" ;;
    brain) "${AK[@]}" dm algo=brain lr=2e-5 max_steps=6 eval_prompts=0 output_dir="$OUT/brain" ;;
    dpo)  # offline DPO on pairs sampled from the model, labelled by the reward
        "${AK[@]}" sample split=train limit=128 k=4 max_new_tokens=32 reward=task:sentiment \
            output="$OUT/dpo-samples.jsonl" --overwrite
        "$PY" scripts/pairs_from_samples.py "$OUT/dpo-samples.jsonl" "$OUT/dpo-pairs.jsonl"
        "${AK[@]}" dpo data="$OUT/dpo-pairs.jsonl" max_steps=32 batch_size=8 max_length=256 \
            output_dir="$OUT/dpo" ;;
    hh_reward) "$PY" benchmarks/hh_reward.py --eval-fraction 0.25 --epochs 0.2 --max-length 192 \
            --lr 2e-5 --output-dir "$OUT/hh_reward"; return ;;
    table) "$PY" scripts/results_table.py "$OUT"/eval-*.json; return ;;
    *) echo "unknown row: $name (rows: ${ROWS[*]} table)" >&2; exit 2 ;;
    esac
    "${AK[@]}" "${EVAL[@]}" --policy "$name=$OUT/$name" --output "$OUT/eval-$name.json"
}

if [ "$#" -eq 0 ]; then set -- "${ROWS[@]}" table; fi
for name in "$@"; do row "$name"; done
