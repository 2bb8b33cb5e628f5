"""The HTML report from fake metrics files and a real eval JSON, opened in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from alignkit.cli import main
from alignkit.eval.report import read_metrics, results_rows, write_report

from .conftest import REPO, write_jsonl

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PLOTS = ("win_rates.png", "frontier.png", "training.png", "length_vs_reward.png", "agreement.png")


def require_chromium() -> None:
    """Fail in CI (CI=true) when Chromium is missing; elsewhere skip with the reason."""
    if Path(CHROMIUM).exists():
        return
    message = f"Chromium is missing ({CHROMIUM}); run scripts/install-system-deps.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory, tiny_model) -> dict:
    """A real ``alignkit eval`` result: the tiny model as two named policies and the reference."""
    from alignkit.models import load_reward_backbone, load_tokenizer

    folder = tmp_path_factory.mktemp("eval")
    load_reward_backbone(tiny_model).save_pretrained(folder / "rm")
    load_tokenizer(tiny_model).save_pretrained(folder / "rm")
    prompts = write_jsonl(
        folder / "prompts.jsonl",
        [{"prompt": f"Review {i}: the film", "split": "eval"} for i in range(8)],
    )
    output = folder / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval", "--prompts", str(prompts), "--gold", "alignkit.tasks.sentiment:gold",
                "--policy", f"ppo={tiny_model}", "--policy", f"dpo={tiny_model}",
                "--reference", tiny_model, "--reward", str(folder / "rm"),
                "--max-new-tokens", "8", "--bootstrap", "200", "--output", str(output),
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    return json.loads(output.read_text())


def fake_metrics(folder: Path) -> dict[str, Path]:
    """metrics.csv files shaped like the recipes': ppo logs kl per step, online_dpo only eval/kl."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = np.arange(1, 9)
    ppo = folder / "ppo.csv"
    ppo.write_text(
        "step,score,kl,loss\n"
        + "".join(f"{s},{0.1 * s:.3f},{0.02 * s * s:.4f},{1 / s:.3f}\n" for s in steps)
    )
    online = folder / "online_dpo.csv"
    rows = ["step,eval/kl,score,loss", "0,0.0,,"]
    rows += [
        f"{s},{'%.3f' % (0.05 * s) if s % 4 == 0 else ''},{0.2 + 0.05 * s:.3f},0.6" for s in steps
    ]
    online.write_text("\n".join(rows) + "\n")
    return {"ppo": ppo, "online_dpo": online}


def fake_feedback() -> dict:
    kappa = [[1.0, 0.8, -0.6], [0.8, 1.0, -0.5], [-0.6, -0.5, 1.0]]
    return {
        "annotators": ["sim-00", "sim-01", "sim-02"],
        "annotator_kinds": {"sim-00": "careful", "sim-01": "careful", "sim-02": "adversarial"},
        "kappa": kappa,
        "excluded": ["sim-02"],
        "num_items": 10,
        "num_judgments": 30,
        "num_pairs": 40,
        "agreement": {"alpha": {"ranking/ordinal": 0.31}},
    }


def test_read_metrics_keeps_gaps_as_nan(tmp_path):
    files = fake_metrics(tmp_path)
    online = read_metrics(files["online_dpo"])
    assert online["step"].tolist() == list(range(0, 9))
    assert np.isnan(online["eval/kl"][1]) and online["eval/kl"][4] == pytest.approx(0.2)
    assert read_metrics(files["ppo"])["kl"][-1] == pytest.approx(1.28)


def test_report_renders_in_chromium(tmp_path, eval_json):
    evaluation = {**eval_json, "policies": [dict(p) for p in eval_json["policies"]]}
    evaluation["policies"][0]["train_seconds"] = 12.5
    # a best-of-n row: scored completions without log-probs, KL given as a bound
    bon = json.loads(json.dumps(evaluation["policies"][1]))
    bon.update(
        name="best_of_n",
        kl={"k1": None, "k3": None, "low": None, "high": None, "upper_bound": 0.64},
    )
    evaluation["policies"].append(bon)
    evaluation["not_run"] = {"grpo": "alignkit.recipes.reinforce not found"}
    report_dir = tmp_path / "report"
    html_path = write_report(
        report_dir, evaluation, fake_metrics(tmp_path / "metrics"), fake_feedback(), "test report"
    )
    for name in PLOTS:
        assert (report_dir / name).stat().st_size > 5_000, name
    text = html_path.read_text()
    assert all(f"src='{name}'" in text for name in PLOTS)
    assert "grpo" in text and "&le; 0.640" in text
    rows = results_rows(evaluation)
    assert [r["method"] for r in rows] == ["ppo", "dpo", "best_of_n"]
    assert rows[0]["train s"] == "12" and rows[1]["train s"] == "-"

    require_chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    profile = tempfile.mkdtemp(prefix="alignkit-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1200, "height": 900},
            )
            page = context.new_page()
            page.goto(html_path.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
            )
            assert len(images) == len(PLOTS)
            assert all(complete and width > 0 for _, complete, width in images), images
            assert page.locator("table tbody tr").count() == 3
            assert page.title() == "test report"
            page.screenshot(path=str(ARTIFACTS / "eval-report.png"), full_page=True)
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert (ARTIFACTS / "eval-report.png").stat().st_size > 10_000
