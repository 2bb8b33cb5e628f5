"""The HTML report: a self-contained directory of report.html and PNG plots (matplotlib, Agg).

Plots: reward and KL per training step of each method (from its ``metrics.csv``), the
reward-vs-KL frontier of all methods, gold win rates with Wilson intervals, the annotator
agreement heatmap (pairwise Cohen's kappa), and response length against reward (the
reward-hacking check). A table lists every method's win rate, KL and wall time.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REWARD_COLUMNS = ("score", "reward", "rewards/mean")  # the reward model's score per step
KL_COLUMNS = ("kl", "eval/kl")  # KL(pi || pi_ref) per step; eval/kl only at eval steps
PALETTE = plt.get_cmap("tab10")


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """A metrics.csv as {column: values (NaN where empty)}, rows in step order."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key in columns:
            text = row.get(key) or ""
            try:
                columns[key].append(float(text))
            except ValueError:
                columns[key].append(math.nan)
    return {key: np.asarray(values) for key, values in columns.items()}


def _first_column(metrics: dict[str, np.ndarray], names: tuple[str, ...]) -> tuple[str, np.ndarray]:
    for name in names:
        values = metrics.get(name)
        if values is not None and np.isfinite(values).any():
            return name, values
    return "", np.zeros(0)


def _color(names: list[str], name: str) -> Any:
    return PALETTE(names.index(name) % 10) if name in names else "black"


def plot_training_curves(
    metrics: dict[str, dict[str, np.ndarray]], order: list[str], path: Path
) -> bool:
    """Reward-model score and KL per step, one line per method. False when nothing to plot."""
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    plotted = False
    for method, columns in metrics.items():
        steps = columns.get("step", np.zeros(0))
        for axis, names in ((ax_reward, REWARD_COLUMNS), (ax_kl, KL_COLUMNS)):
            name, values = _first_column(columns, names)
            keep = np.isfinite(values)
            if not keep.any() or len(steps) != len(values):
                continue
            label = method if name in (names[0], "kl") else f"{method} ({name})"
            marker = "o" if keep.sum() <= 12 else None
            axis.plot(steps[keep], values[keep], marker=marker, ms=4, label=label,
                      color=_color(order, method), lw=1.6)  # fmt: skip
            plotted = True
    ax_reward.set(title="reward-model score of the rollouts", xlabel="step", ylabel="score")
    ax_kl.set(title="KL(policy || reference)", xlabel="step", ylabel="nats per completion")
    for axis in (ax_reward, ax_kl):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return plotted


def _kl_value(policy: dict[str, Any]) -> tuple[float, bool]:
    """(KL estimate k3, or the best-of-n upper bound; is it a bound)."""
    kl = policy["kl"]
    if kl.get("k3") is not None:
        return float(kl["k3"]), False
    return float(kl.get("upper_bound") or math.nan), True


def plot_frontier(evaluation: dict[str, Any], order: list[str], path: Path) -> None:
    """Gold score and reward-model score against KL for every method and the reference."""
    reference = evaluation["reference_metrics"]
    has_reward = "reward" in reference
    panels = [("gold", "gold score (the true objective)")]
    if has_reward:
        panels.append(("reward", "reward-model score (what was optimised)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 4.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        axis.errorbar([0.0], [reference[key]["estimate"]], fmt="s", color="black", ms=7,
                      yerr=[[reference[key]["estimate"] - reference[key]["low"]],
                            [reference[key]["high"] - reference[key]["estimate"]]],
                      capsize=3, label="reference")  # fmt: skip
        for policy in evaluation["policies"]:
            value = policy.get(key)
            if value is None:
                continue
            kl, is_bound = _kl_value(policy)
            color = _color(order, policy["name"])
            axis.errorbar([kl], [value["estimate"]], fmt="<" if is_bound else "o",
                          yerr=[[value["estimate"] - value["low"]], [value["high"] - value["estimate"]]],
                          color=color, ms=7, capsize=3, mfc="white" if is_bound else color,
                          label=policy["name"] + (" (KL bound)" if is_bound else ""))  # fmt: skip
        axis.set(title=title, xlabel="KL(policy || reference), nats", ylabel=f"mean {key}")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("reward vs KL frontier (95% bootstrap intervals over prompts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_win_rates(evaluation: dict[str, Any], order: list[str], path: Path) -> None:
    """Gold win rate over the reference with its Wilson interval, one bar per method."""
    policies = evaluation["policies"]
    names = [p["name"] for p in policies]
    rates = np.array([p["gold_win_rate"]["win_rate"] for p in policies], dtype=float)
    low = np.array([p["gold_win_rate"]["low"] for p in policies], dtype=float)
    high = np.array([p["gold_win_rate"]["high"] for p in policies], dtype=float)
    fig, axis = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.6))
    positions = np.arange(len(names))[::-1]
    axis.barh(positions, rates, color=[_color(order, n) for n in names], alpha=0.85,
              xerr=[rates - low, high - rates], capsize=4, error_kw={"lw": 1.2})  # fmt: skip
    for y, rate, top in zip(positions, rates, high, strict=True):
        axis.text(min(top + 0.02, 0.93), y, f"{rate:.2f}", va="center", fontsize=9)
    axis.axvline(0.5, color="black", ls="--", lw=1)
    axis.set_yticks(positions, names)
    axis.set_xlim(0, 1)
    axis.set_xlabel("gold win rate over the reference, ties = 1/2 (95% Wilson interval)")
    axis.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_agreement(feedback: dict[str, Any], path: Path) -> None:
    """Pairwise Cohen's kappa between annotators; excluded annotators marked with *."""
    annotators = feedback["annotators"]
    kinds = feedback.get("annotator_kinds", {})
    excluded = set(feedback.get("excluded", []))
    kappa = np.array([[math.nan if v is None else v for v in row] for row in feedback["kappa"]])
    labels = [
        f"{a}{' *' if a in excluded else ''}" + (f"\n{kinds[a]}" if a in kinds else "")
        for a in annotators
    ]
    size = 1.0 + 0.75 * len(annotators)
    fig, axis = plt.subplots(figsize=(size + 1.6, size))
    image = axis.imshow(np.ma.masked_invalid(kappa), cmap="RdBu", vmin=-1, vmax=1)
    for i in range(len(annotators)):
        for j in range(len(annotators)):
            if np.isfinite(kappa[i, j]):
                axis.text(j, i, f"{kappa[i, j]:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if abs(kappa[i, j]) > 0.6 else "black")  # fmt: skip
    axis.set_xticks(range(len(annotators)), labels, fontsize=7, rotation=90)
    axis.set_yticks(range(len(annotators)), labels, fontsize=7)
    fig.colorbar(image, ax=axis, label="Cohen's kappa (weighted, ranking units)", shrink=0.8)
    axis.set_title("annotator agreement (* = excluded from the pairs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _length_axis(systems: list[tuple[str, dict[str, Any]]]) -> tuple[str, str]:
    """("tokens", label) when completion lengths vary; ("chars", label) when every completion
    ran to the token limit (then only the character count still varies)."""
    tokens = [r["tokens"] for _, system in systems for r in system.get("samples", [])]
    if len(set(tokens)) > 1:
        return "tokens", "completion tokens"
    return "chars", "completion characters (every completion hit the token limit)"


def plot_length_vs_reward(evaluation: dict[str, Any], order: list[str], path: Path) -> None:
    """Completion length against reward-model score and gold score, per sample; the legend
    gives each system's Pearson correlation r between length and score."""
    systems = [("reference", evaluation["reference_metrics"])] + [
        (p["name"], p) for p in evaluation["policies"]
    ]
    has_reward = all("reward" in row for row in evaluation["reference_metrics"].get("samples", []))
    keys = (["reward"] if has_reward else []) + ["gold"]
    length_key, length_label = _length_axis(systems)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.8 * len(keys), 4.6), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for name, system in systems:
            rows = [r for r in system.get("samples", []) if key in r]
            if not rows:
                continue
            if length_key == "chars":
                lengths = np.array([len(r["completion"]) for r in rows], dtype=float)
            else:
                lengths = np.array([r["tokens"] for r in rows], dtype=float)
            values = np.array([r[key] for r in rows], dtype=float)
            color = "black" if name == "reference" else _color(order, name)
            spread = lengths.std() > 0 and values.std() > 0
            r = float(np.corrcoef(lengths, values)[0, 1]) if spread else math.nan
            axis.scatter(lengths, values, s=9, alpha=0.25, color=color, linewidths=0)
            axis.scatter([lengths.mean()], [values.mean()], s=110, marker="X", color=color,
                         edgecolor="white", label=f"{name} (r={r:+.2f})")  # fmt: skip
        what = "reward-model score" if key == "reward" else "gold score"
        axis.set(title=f"length vs {what}", xlabel=length_label, ylabel=what)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, title="mean (X), length-score r", title_fontsize=7)
    fig.suptitle("reward hacking check: does the reward model pay for length that gold does not?",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, int | float) else html.escape(str(value))


def results_rows(evaluation: dict[str, Any]) -> list[dict[str, str]]:
    """One row per method: win rate [interval], KL, gold, length, distinct-2, times."""
    rows = []
    for policy in evaluation["policies"]:
        win = policy["gold_win_rate"]
        kl, is_bound = _kl_value(policy)
        rows.append(
            {
                "method": policy["name"],
                "gold win rate [95% Wilson]": f"{_fmt(win['win_rate'])} "
                f"[{_fmt(win['low'])}, {_fmt(win['high'])}]",
                "ties": _fmt(win["tie_rate"], 2),
                "KL (nats)": ("&le; " if is_bound else "") + _fmt(kl),
                "gold": _fmt(policy["gold"]["estimate"]),
                "RM win rate": _fmt(policy.get("reward_win_rate", {}).get("win_rate")),
                "tokens": _fmt(policy["length"]["mean_tokens"], 1),
                "distinct-2": _fmt(policy["distinct_2"]),
                "train s": _fmt(policy.get("train_seconds"), 0),
                "eval s": _fmt(policy.get("eval_seconds"), 0),
            }
        )
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>No method finished.</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{v}</td>" for v in row.values()) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1150px;margin:24px auto;
padding:0 16px;color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:4px}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child
{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.note{color:#555;font-size:.9em}code{background:#f5f5f5;padding:1px 4px}
"""


def write_report(
    output_dir: Path,
    evaluation: dict[str, Any],
    metrics_files: dict[str, Path] | None = None,
    feedback: dict[str, Any] | None = None,
    title: str = "alignkit report",
) -> Path:
    """Write ``report.html`` and its PNGs into ``output_dir``; returns the HTML path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    order = [p["name"] for p in evaluation["policies"]]
    for name in metrics_files or {}:
        order += [] if name in order else [name]
    sections = []
    demo = evaluation.get("demo", {})
    intro = (
        f"Task <code>{html.escape(str(evaluation.get('task', '')))}</code>, "
        f"{evaluation.get('num_prompts', '?')} held-out prompts, every method compared with "
        f"the reference <code>{html.escape(str(evaluation.get('reference', '')))}</code>."
    )
    if demo:
        rm = demo.get("reward_model", {})
        intro += (
            f" Reward model: held-out pair accuracy {_fmt(rm.get('eval/rewards/accuracy'))}, "
            f"agreement with gold on reference samples {_fmt(rm.get('gold_agreement'))}. "
            f"Total wall time {_fmt(demo.get('wall_seconds'), 0)} s on {demo.get('threads')} "
            "thread(s)."
        )
    sections.append(f"<p>{intro}</p>")
    sections.append("<h2>Results</h2>" + _table(results_rows(evaluation)))
    not_run = evaluation.get("not_run") or {}
    if not_run:
        items = "".join(
            f"<li>{html.escape(m)}: {html.escape(str(e))}</li>" for m, e in not_run.items()
        )
        sections.append(f"<p class='note'>Not in the table:</p><ul class='note'>{items}</ul>")

    plot_win_rates(evaluation, order, output_dir / "win_rates.png")
    sections.append(
        "<h2>Gold win rate over the reference</h2><img src='win_rates.png' alt='win rates'>"
    )
    plot_frontier(evaluation, order, output_dir / "frontier.png")
    sections.append(
        "<h2>Reward vs KL</h2><img src='frontier.png' alt='frontier'><p class='note'>KL is the k3 "
        "estimate from the method's own samples; best-of-n has no log-probs, so its point sits "
        "at the upper bound log n - (n-1)/n (hollow marker).</p>"
    )
    metrics = {m: read_metrics(p) for m, p in (metrics_files or {}).items() if Path(p).is_file()}
    if metrics and plot_training_curves(metrics, order, output_dir / "training.png"):
        sections.append(
            "<h2>Training curves</h2><img src='training.png' alt='training curves'>"
            "<p class='note'>Reward-model score of each step's rollouts, and KL to the reference "
            "(the recipe's own estimate, or its held-out evaluation where it logs none). DPO and "
            "best-of-n do not sample while training.</p>"
        )
    plot_length_vs_reward(evaluation, order, output_dir / "length_vs_reward.png")
    sections.append(
        "<h2>Response length vs reward</h2><img src='length_vs_reward.png' alt='length vs reward'>"
    )
    if feedback and feedback.get("annotators"):
        plot_agreement(feedback, output_dir / "agreement.png")
        agreement = feedback.get("agreement", {})
        alpha = ", ".join(f"{k} {_fmt(v)}" for k, v in agreement.get("alpha", {}).items())
        sections.append(
            "<h2>Annotator agreement</h2><img src='agreement.png' alt='agreement heatmap'>"
            f"<p class='note'>{feedback.get('num_judgments')} judgments on "
            f"{feedback.get('num_items')} items; Krippendorff's alpha: {alpha}; "
            f"{feedback.get('num_pairs')} preference pairs after excluding "
            f"{', '.join(feedback.get('excluded', [])) or 'nobody'}.</p>"
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}"
        "</body></html>"
    )
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def build_report(run_dir: str | Path) -> Path:
    """The report of a demo run directory (results.json, feedback.json, <method>/metrics.csv)."""
    run_dir = Path(run_dir)
    evaluation = json.loads((run_dir / "results.json").read_text())
    feedback_path = run_dir / "feedback.json"
    feedback = json.loads(feedback_path.read_text()) if feedback_path.is_file() else None
    metrics_files = {
        folder.name: folder / "metrics.csv"
        for folder in sorted(run_dir.iterdir())
        if (folder / "metrics.csv").is_file() and folder.name not in ("reward_model", "sft")
    }
    task = evaluation.get("task", "")
    return write_report(run_dir, evaluation, metrics_files, feedback, f"alignkit demo: {task}")
