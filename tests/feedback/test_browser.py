"""Chromium (Debian's, through Playwright) logs in, reads the guidelines, labels by click and
by keyboard, orders a ranking; the judgments are in the database. Screenshots: test-artifacts/."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from alignkit.feedback.records import Item
from alignkit.feedback.web.app import create_app

from .conftest import ARTIFACTS, PASSWORDS, require_system_tool, running_server

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
GUIDELINES = "# Which reply is better?\n\nPrefer the reply that is **correct**, then the one that is *shorter*.\n\n- Ties are fine.\n- Both bad: neither answers."

pytestmark = pytest.mark.browser


@pytest.fixture
def browser_page(people):
    require_system_tool(CHROMIUM, "Chromium (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(create_app(people)) as url, sync_playwright() as playwright:
        profile = tempfile.mkdtemp(prefix="alignkit-chromium-")
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 850},
        )
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page, url
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def _log_in(page, url: str, name: str) -> None:
    page.goto(f"{url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")


def test_label_by_click_keyboard_and_ranking(people, browser_page) -> None:
    page, url = browser_page
    prompts = ["What is 2 + 2?", "Name a colour.", "Capital of France?"]
    answers = [
        ("4", "Four, because 2 + 2 = 4."),
        ("Blue.", "Red is a colour."),
        ("Paris.", "Lyon."),
    ]
    pairwise = people.create_project("arith", "pairwise", 2, overlap=1, guidelines=GUIDELINES)
    people.add_items(
        pairwise.id,
        [Item(f"q{i}", p, a) for i, (p, a) in enumerate(zip(prompts, answers, strict=True))],
    )
    ranking = people.create_project("poems", "ranking", 3, overlap=1, guidelines="Rank best first.")
    people.add_items(
        ranking.id,
        [
            Item(
                "r0",
                "A haiku about rain.",
                ("Rain taps the window", "Wet.", "Clouds weep softly now"),
            )
        ],
    )

    _log_in(page, url, "ann")
    page.click(f"a[href='/projects/{pairwise.id}']")
    assert page.inner_text("#guidelines h1") == "Which reply is better?"
    assert page.inner_text("#guidelines strong") == "correct"
    page.screenshot(path=str(ARTIFACTS / "label-guidelines.png"), full_page=True)
    page.click("#start")

    # 1. by click: pick the card shown second (B), then Submit
    page.wait_for_selector("#label-form")
    first_item = page.get_attribute("input[name=item_id]", "value")
    page.click("#completion-1 .text")
    assert "chosen" in page.get_attribute("#completion-1", "class")
    page.screenshot(path=str(ARTIFACTS / "label-pairwise.png"), full_page=True)
    page.click("#submit")
    page.wait_for_selector(f"input[name=item_id]:not([value='{first_item}'])", state="attached")

    # 2. by keyboard: 1 (A is better) then Enter; 3. T (tie) then Enter
    second_item = page.get_attribute("input[name=item_id]", "value")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"input[name=item_id]:not([value='{second_item}'])", state="attached")
    page.keyboard.press("x")
    page.keyboard.press("Enter")
    page.wait_for_selector("text=All done")

    judgments = {j.item_id: j for j in people.judgments(pairwise.id)}
    assert len(judgments) == 3
    order = judgments[first_item].display_order
    assert judgments[first_item].ranking == ((order[1],), (order[0],))
    order = judgments[second_item].display_order
    assert judgments[second_item].ranking == ((order[0],), (order[1],))
    last = next(j for key, j in judgments.items() if key not in (first_item, second_item))
    assert last.ranking == ((0, 1),) and last.both_bad is True
    assert all(
        j.annotator == "ann" and j.source == "human" and j.seconds >= 0 for j in judgments.values()
    )

    # 4. a ranking: click the cards best first (third shown, first shown, second shown)
    page.goto(f"{url}/projects/{ranking.id}")
    page.click("#start")
    for position in (2, 0, 1):
        page.click(f"#completion-{position} .text")
    assert page.input_value("select[name=rank_2]") == "1"
    page.screenshot(path=str(ARTIFACTS / "label-ranking.png"), full_page=True)
    page.click("#submit")
    page.wait_for_selector("text=All done")
    [ranked] = people.judgments(ranking.id)
    shown = ranked.display_order
    assert ranked.ranking == ((shown[2],), (shown[0],), (shown[1],))

    # the admin sees the statistics page
    page.click("button:has-text('Log out')")
    _log_in(page, url, "admin")
    page.goto(f"{url}/admin/projects/{pairwise.id}")
    assert page.inner_text(".stats .stat:nth-child(2) b") == "3"
    page.screenshot(path=str(ARTIFACTS / "label-admin.png"), full_page=True)
