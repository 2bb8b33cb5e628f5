#!/usr/bin/env bash
# Reproduce docs/results.md: every online recipe and offline DPO on a built-in task
# (sentiment by default; harmless with --task harmless), from the embedded
# SmolLM2-135M-Instruct with the task's gold judge as the reward, each evaluated against
# the starting model on all the task's held-out prompts with 4 samples each; and the
# HH-RLHF reward-model benchmark (sentiment only: it does not depend on the task).
#
#   scripts/results.sh                       # every sentiment row (about 2 hours on 2 shared cores)
#   scripts/results.sh grpo rloo             # some rows; names: see ROWS below
#   scripts/results.sh table                 # the markdown table from the eval JSONs
#   scripts/results.sh --task harmless bon   # a harmless row (or TASK=harmless scripts/results.sh bon)
#
# One thread per process (OMP_NUM_THREADS=1); on 2 cores run two invocations at once.
# Outputs: sentiment -> runs/results/NAME (the policy) and runs/results/eval-NAME.json;
# harmless -> the same under runs/results/harmless/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PYTHON:-python}"
AK=("$PY" -m alignkit.cli)
TASK="${TASK:-sentiment}"
if [ "${1:-}" = "--task" ]; then
    if [ "$#" -lt 2 ]; then echo "--task needs a name (sentiment, harmless)" >&2; exit 2; fi
    TASK="$2"
    shift 2
fi
case "$TASK" in
sentiment)  # 64 eval prompts, 32 new tokens; the recipes' own task/reward defaults
    OUT=runs/results
    NEW_TOKENS=32
    BON_PROMPTS=64
    TASK_ARGS=()
    ROWS=(ppo rloo grpo reinforce_pp bon rsft online_dpo dpg brain dpo hh_reward) ;;
harmless)  # 32 eval prompts (16 harmful, 16 benign); replies need more than 32 tokens
    OUT=runs/results/harmless
    NEW_TOKENS=64
    BON_PROMPTS=0
    TASK_ARGS=(task=harmless reward=task:harmless max_new_tokens="$NEW_TOKENS")
    ROWS=(bon grpo rloo reinforce_pp ppo rsft online_dpo dpg brain dpo) ;;
*) echo "unknown task: $TASK (tasks: sentiment harmless)" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
# the same reference samples (seed 0) for every row
EVAL=(eval --task "$TASK" --reference smollm2-135m-instruct --samples-per-prompt 4
      --max-new-tokens "$NEW_TOKENS" --temperature 1.0)

row() {
    local name="$1"
    case "$name" in
    ppo) "${AK[@]}" ppo lr=3e-5 lr_schedule=constant temperature=1.0 max_steps=12 \
            eval_prompts=0 output_dir="$OUT/ppo" "${TASK_ARGS[@]}" ;;
    rloo) "${AK[@]}" rl algo=rloo lr=2e-5 lr_schedule=constant max_steps=12 \
            eval_prompts=0 output_dir="$OUT/rloo" "${TASK_ARGS[@]}" ;;
    grpo) "${AK[@]}" rl algo=grpo lr=2e-5 lr_schedule=constant kl_coef=0.04 max_steps=12 \
            eval_prompts=0 output_dir="$OUT/grpo" "${TASK_ARGS[@]}" ;;
    reinforce_pp) "${AK[@]}" rl algo=reinforce_pp lr=2e-5 lr_schedule=constant max_steps=12 \
            eval_prompts=0 output_dir="$OUT/reinforce_pp" "${TASK_ARGS[@]}" ;;
    bon)  # four best-of-8 runs with different seeds = 4 samples per prompt
        for seed in 0 1 2 3; do
            "${AK[@]}" bon n=8 max_prompts="$BON_PROMPTS" seed="$seed" \
                output_dir="$OUT/bon-seed$seed" "${TASK_ARGS[@]}"
        done
        "${AK[@]}" "${EVAL[@]}" --output "$OUT/eval-bon.json" --completions \
            "bon=$OUT/bon-seed0/best_of_n.jsonl,$OUT/bon-seed1/best_of_n.jsonl,$OUT/bon-seed2/best_of_n.jsonl,$OUT/bon-seed3/best_of_n.jsonl"
        return ;;
    rsft) "${AK[@]}" rsft lr=2e-5 eval_prompts=0 output_dir="$OUT/rsft" "${TASK_ARGS[@]}" ;;
    online_dpo) "${AK[@]}" online-dpo eval_prompts=0 output_dir="$OUT/online_dpo" \
            "${TASK_ARGS[@]}" ;;
    dpg) "${AK[@]}" dm algo=dpg lr=2e-5 max_steps=8 updates_per_batch=4 eval_prompts=0 \
            output_dir="$OUT/dpg" "${TASK_ARGS[@]}" ;;
    brain) "${AK[@]}" dm algo=brain lr=2e-5 max_steps=6 eval_prompts=0 output_dir="$OUT/brain" \
            "${TASK_ARGS[@]}" ;;
    dpo)  # offline DPO on pairs sampled from the model, labelled by the reward
        "${AK[@]}" sample task="$TASK" split=train limit=128 k=4 max_new_tokens="$NEW_TOKENS" \
            reward=task:"$TASK" output="$OUT/dpo-samples.jsonl" --overwrite
        "$PY" scripts/pairs_from_samples.py "$OUT/dpo-samples.jsonl" "$OUT/dpo-pairs.jsonl"
        # lr 5e-5 constant: the default 5e-6 (linear decay) did not move the model in 32 steps
        "${AK[@]}" dpo data="$OUT/dpo-pairs.jsonl" max_steps=32 batch_size=8 max_length=256 \
            lr=5e-5 lr_schedule=constant beta=0.1 output_dir="$OUT/dpo" ;;
    hh_reward)  # task-independent: sentiment rows only
        if [ "$TASK" != sentiment ]; then echo "hh_reward is a sentiment-only row" >&2; exit 2; fi
        "$PY" benchmarks/hh_reward.py --eval-fraction 0.25 --epochs 0.2 --max-length 192 \
            --lr 2e-5 --output-dir "$OUT/hh_reward"; return ;;
    table) "$PY" scripts/results_table.py "$OUT"/eval-*.json; return ;;
    *) echo "unknown row: $name (rows: ${ROWS[*]} table)" >&2; exit 2 ;;
    esac
    "${AK[@]}" "${EVAL[@]}" --policy "$name=$OUT/$name" --output "$OUT/eval-$name.json"
}

if [ "$#" -eq 0 ]; then set -- "${ROWS[@]}" table; fi
for name in "$@"; do row "$name"; done
