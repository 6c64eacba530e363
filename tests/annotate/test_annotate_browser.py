"""A real browser (Playwright driving Debian's headless chromium, installed by .ci/services.sh): log in, label a
comparison by keyboard, a rating, skip one item, write an edit, and see the stored labels; model output carrying
<script> and <img onerror> payloads is shown as text and never runs."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("RLHFKIT_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_A = '<script>window.__pwned = "script"</script>Once there was a cat.'
XSS_B = '<img src=x onerror="window.__pwned = \'img\'">The dog ran home fast.'


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM}: run .ci/services.sh (apt-get install chromium chromium-driver)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_label_by_keyboard_in_chromium(browser, tmp_path):
    from rlhfkit.annotate.api import LocalServer

    with LocalServer(str(tmp_path / "ui.db")) as server:
        store = server.store
        server.create_project("ui", kinds=["pairwise", "rating", "edit"], k=1, criteria=["helpful", "fluent"],
                              scale_min=1, scale_max=5, gold_rate=0.0)
        server.import_file("ui", [{"prompt": [{"role": "user", "content": "Tell me a <b>story</b>."}],
                                   "completions": [XSS_A, XSS_B]}], shuffle_pairs=False)
        user, _ = store.create_user(name="alice", role="annotator", password="s3cret")
        store.add_member(project_id=store.get_project(name="ui").id, user_id=user.id)

        page = browser.new_page()
        page.goto(server.url + "/")
        assert "/login" in page.url
        page.fill("#name", "alice")
        page.fill("#password", "s3cret")
        with page.expect_navigation():
            page.click("#login")
        with page.expect_navigation():
            page.click("a.project-link")

        # comparison: model output is shown as text, nothing ran; s s = strength "clearly", 2 = B is better
        assert page.get_attribute("#label-form", "data-kind") == "pairwise"
        assert "<script>" in page.inner_text("#completion-a") and "onerror" in page.inner_text("#completion-b")
        assert "<b>story</b>" in page.inner_text("section.prompt")  # the conversation turn, as text
        assert page.evaluate("window.__pwned") is None
        page.keyboard.press("s")
        page.keyboard.press("s")
        with page.expect_navigation():
            page.keyboard.press("2")
        assert page.is_visible("#saved")

        # rating: digits rate the highlighted criterion and move on, Enter submits
        assert page.get_attribute("#label-form", "data-kind") == "rating"
        page.keyboard.press("4")
        page.keyboard.press("5")
        with page.expect_navigation():
            page.keyboard.press("Enter")

        # the second rating item: skip it with n
        assert page.get_attribute("#label-form", "data-kind") == "rating"
        with page.expect_navigation():
            page.keyboard.press("n")

        # edit: e focuses the text box, type, Ctrl+Enter submits; tags with g
        assert page.get_attribute("#label-form", "data-kind") == "edit"
        page.keyboard.press("g")
        page.keyboard.type("unfinished")
        page.keyboard.press("Escape")
        page.keyboard.press("e")
        page.keyboard.type(" Then they had tea.")
        with page.expect_navigation():
            page.keyboard.press("Control+Enter")
        assert page.evaluate("window.__pwned") is None

        page.goto(server.url + f"/projects/{store.get_project(name='ui').id}/mine")
        rows = page.locator("tr.label-row")
        assert rows.count() == 3
        text = page.inner_text("#my-labels")
        assert "B (strength 2)" in text and "helpful=4" in text and "fluent=5" in text
        assert "Then they had tea." in text and "unfinished" in text
        assert page.evaluate("window.__pwned") is None

        labels = {lab["kind"]: lab for lab in store.labels(project_id=store.get_project(name="ui").id)}
        assert labels["pairwise"]["choice"] == "B" and labels["pairwise"]["strength"] == 2
        assert labels["rating"]["ratings"] == {"helpful": 4, "fluent": 5}
        edited = labels["edit"]["edited"]
        assert edited.endswith(" Then they had tea.") and edited.startswith(("<script>", "<img"))
        assert labels["edit"]["tags"] == ["unfinished"]
        assert all(lab["duration_ms"] is not None for lab in labels.values())
