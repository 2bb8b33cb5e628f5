"""Preference pairs from scored samples: ``alignkit sample ... reward=...`` -> ``alignkit dpo``.

For each row of the sample file (``prompt``, ``completions``, ``scores``) the best and
the worst completion by score become one pair; rows whose best and worst tie are left
out. Chat prompts give conversational pairs (the replies as assistant turns).

    python scripts/pairs_from_samples.py samples.jsonl pairs.jsonl
"""

from __future__ import annotations

import json
import sys


def pairs(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        scores, texts = row["scores"], row["completions"]
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] == scores[worst]:
            continue
        chosen, rejected = texts[best], texts[worst]
        if isinstance(row["prompt"], list):
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        out.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if any("scores" not in row for row in rows):
        print(f"{argv[0]}: rows have no 'scores': sample with reward=...", file=sys.stderr)
        return 2
    made = pairs(rows)
    with open(argv[1], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(pair) + "\n" for pair in made)
    print(f"{len(made)} pairs from {len(rows)} prompts -> {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
