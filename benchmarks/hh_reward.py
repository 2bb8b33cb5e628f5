"""Reward model on real human preferences: Anthropic HH-RLHF harmless-base.

Trains ``alignkit reward`` (Bradley-Terry, the embedded SmolLM2-135M-Instruct backbone)
on a seeded share of ../shared/data/hh-rlhf-harmless-base.jsonl.gz, read in place, and
reports pairwise accuracy on the held-out rest (chance: 50%) with its Wilson interval. Next to it, the accuracy
of "prefer the longer reply" on the same held-out pairs, the shortcut a reward model
can learn instead of harmlessness.

    OMP_NUM_THREADS=1 python benchmarks/hh_reward.py                  # ~1,250 train pairs, 1 epoch
    python benchmarks/hh_reward.py --eval-fraction 0.5 --max-length 256 --lr 2e-5

Writes ``OUTPUT_DIR/benchmark.json`` (the settings, held-out accuracy, the length
baseline and the wall time) and prints it. The model is in ``OUTPUT_DIR`` as usual.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HH_PATH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base.jsonl.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HH_PATH), help="HH transcripts (.jsonl.gz)")
    parser.add_argument("--eval-fraction", type=float, default=0.35, help="share held out")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the train pairs")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=320, help="prompt + reply tokens")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = full weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/bench/hh_reward")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def held_out_accuracy(model_dir: str, rows: list, eval_ids: list[int], batch_size: int) -> dict:
    """Per-pair accuracy of the saved reward model on the held-out pairs (a tie counts
    half), with its Wilson 95% interval. (The recipe's ``eval/rewards/accuracy`` is a
    mean of batch means, so a short last batch weighs as much as a full one.)"""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.data import collate_pairs
    from alignkit.eval.stats import wilson_interval
    from alignkit.models import load_tokenizer
    from alignkit.recipes.reward import reward_scores

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pad_id = load_tokenizer(model_dir).pad_token_id
    correct = 0.0
    with torch.no_grad():
        for start in range(0, len(eval_ids), batch_size):
            batch = collate_pairs([rows[i] for i in eval_ids[start : start + batch_size]], pad_id)
            chosen, rejected = reward_scores(
                model, batch["input_ids"], batch["attention_mask"]
            ).chunk(2)
            correct += float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
    low, high = wilson_interval(correct, len(eval_ids))
    return {"accuracy": correct / len(eval_ids), "low": low, "high": high, "n": len(eval_ids)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from alignkit.data import load_preferences, tokenize_pairs
    from alignkit.models import load_tokenizer
    from alignkit.recipes.offline import load_rows
    from alignkit.recipes.reward import Config, run
    from alignkit.training.common import set_threads

    set_threads()
    config = Config(
        data=args.data,
        invalid_rows="skip",
        eval_fraction=args.eval_fraction,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        seed=args.seed,
        output_dir=args.output_dir,
    )
    config.lora.r = args.lora_r
    config.validate()
    # the same rows and split the recipe makes (same config, same seed)
    rows, train_ids, eval_ids = load_rows(
        config, load_tokenizer(config.model), load_preferences, tokenize_pairs
    )
    config.max_steps = max(1, math.ceil(args.epochs * len(train_ids) / args.batch_size))
    longer = [len(rows[i].chosen_ids) - len(rows[i].rejected_ids) for i in eval_ids]
    length_baseline = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in longer) / len(longer)

    started = time.time()
    summary = run(config, overwrite=args.overwrite)
    result = {
        "data": args.data,
        "model": config.model,
        "train_pairs": len(train_ids),
        "eval_pairs": len(eval_ids),
        "epochs": args.epochs,
        "max_steps": config.max_steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "lora_r": args.lora_r,
        "seed": args.seed,
        "eval_accuracy": held_out_accuracy(args.output_dir, rows, eval_ids, args.batch_size),
        **{key: value for key, value in summary.items() if key.startswith("eval/")},
        "length_baseline_accuracy": length_baseline,
        "wall_seconds": time.time() - started,
    }
    Path(args.output_dir, "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
