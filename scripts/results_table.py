"""The docs/results.md table from ``alignkit eval`` JSON files.

    python scripts/results_table.py runs/results/eval-*.json

One row per evaluated policy: gold win rate over the reference with its Wilson 95%
interval, mean gold with its bootstrap interval, the paired gain over the reference with
its interval, KL(pi || pi_ref) (k3, nats per completion; best-of-n: the upper bound) and
the training wall time read from the policy directory's summary.json when there is one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _wall(path: str) -> str:
    summary = Path(path) / "summary.json" if path else None
    if summary is None or not summary.is_file():
        return "-"
    seconds = json.loads(summary.read_text()).get("wall_seconds")
    return f"{seconds / 60:.1f} min" if seconds is not None else "-"


def rows(files: list[str]) -> list[str]:
    out = [
        "| policy | gold win rate [95% Wilson] | mean gold [95% bootstrap] | gain over ref "
        "[95% paired bootstrap] | KL k3 (nats) | train wall |",
        "|---|---|---|---|---|---|",
    ]
    references = set()
    for file in files:
        result = json.loads(Path(file).read_text())
        ref = result["reference_metrics"]["gold"]
        references.add(f"{ref['estimate']:.3f} [{ref['low']:.3f}, {ref['high']:.3f}]")
        for policy in result["policies"]:
            win, gold, gain, kl = (policy[k] for k in ("gold_win_rate", "gold", "gold_gain", "kl"))
            kl_text = (
                f"{kl['k3']:.2f} [{kl['low']:.2f}, {kl['high']:.2f}]"
                if kl["k3"] is not None
                else f"<= {kl['upper_bound']:.2f} (bound)"
            )
            out.append(
                f"| {policy['name']} | {win['win_rate']:.3f} [{win['low']:.3f}, {win['high']:.3f}] "
                f"| {gold['estimate']:.3f} [{gold['low']:.3f}, {gold['high']:.3f}] "
                f"| {gain['estimate']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] "
                f"| {kl_text} | {_wall(policy.get('path', ''))} |"
            )
    out.append("")
    out.append(f"reference mean gold: {', '.join(sorted(references))}")
    return out


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1:])))
