"""report.html in a real headless Chromium (Debian's, driven by Playwright): it renders, every
image loads, nothing is logged as an error, and untrusted strings stay text.

Skipped only where Chromium or Playwright is missing; CI installs both (scripts/test.sh installs
Debian's chromium, the dev extra installs playwright)."""

import shutil
import tempfile
from pathlib import Path

import pytest

from distiq.report import collect_inputs, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium is not installed (`apt-get install chromium`; scripts/test.sh does it)",
    ),
    pytest.mark.slow,
]
# the flags this machine's closed network needs (no background connections, no sandbox as root)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# what the page says about itself, read in the browser after it loaded
PAGE_FACTS = """async () => ({
    title: document.title,
    images: await Promise.all([...document.images].map(async i => {
        await i.decode();
        // the plots are opaque: a truncated PNG still has a size, but its last rows are empty
        const canvas = document.createElement("canvas");
        canvas.width = i.naturalWidth;
        canvas.height = i.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(i, 0, 0);
        const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let opaque = 0;
        for (let k = 3; k < pixels.length; k += 4) opaque += pixels[k] === 255;
        return {alt: i.alt, complete: i.complete, width: i.naturalWidth,
                height: i.naturalHeight, opaque: opaque / (pixels.length / 4)};
    })),
    scripts: document.querySelectorAll("script, iframe, object, embed, svg").length,
    handlers: [...document.querySelectorAll("*")].flatMap(
        e => [...e.attributes].filter(a => a.name.startsWith("on")).map(a => e.tagName + " " + a.name)),
    tags: [...new Set([...document.body.querySelectorAll("*")].map(e => e.tagName.toLowerCase()))].sort(),
    injected: window.injected === undefined ? null : String(window.injected),
    text: document.body.innerText,
    headings: [...document.querySelectorAll("h1, h2, h3")].map(h => h.textContent),
})"""
ALLOWED_TAGS = ["h1", "h2", "h3", "img", "li", "p", "table", "tbody", "td", "th", "tr", "ul"]


@pytest.fixture(scope="module")
def browser():
    """Chromium with a new, empty profile, as a Playwright browser context."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    with (
        tempfile.TemporaryDirectory(prefix="distiq-chromium-") as profile,
        sync_api.sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield context
        context.close()


def _open(browser, path: Path):
    """Open ``path`` and wait until it and its images have loaded: (page, facts, problems), the
    problems being console errors, page errors, dialogs and failed requests."""
    page = browser.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url[:80]}"))
    page.goto(path.as_uri(), wait_until="load", timeout=20_000)
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=10_000)
    return page, page.evaluate(PAGE_FACTS), problems


def _check_page(facts, problems, images):
    assert problems == []
    assert len(facts["images"]) == images
    for image in facts["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
        assert image["opaque"] == 1.0, image  # every pixel decoded
    assert facts["scripts"] == 0 and facts["handlers"] == [] and facts["injected"] is None
    assert set(facts["tags"]) <= set(ALLOWED_TAGS), facts["tags"]


def test_demo_report_renders_with_every_image(browser, tmp_path, fixtures):
    root = fixtures.write_demo_dir(tmp_path / "demo", fixtures.crowded_records(), questions=10_000)
    files = write_report(collect_inputs([root]), root)
    page, facts, problems = _open(browser, files.html)
    _check_page(facts, problems, images=4)
    assert facts["title"] == "distiq report"
    assert {"distiq report", "Results: vqa (vqa_accuracy)", "Goals"} <= set(facts["headings"])
    assert "Slower than the teacher on the same backend: gptq-w4a8" in facts["text"]
    page.screenshot(path=str(root / "report.png"), full_page=True)  # to look at by hand
    page.close()


def test_untrusted_strings_stay_text(browser, tmp_path, fixtures):
    root = fixtures.write_hostile_dir(tmp_path / "hostile")
    files = write_report(collect_inputs([root]), root)
    page, facts, problems = _open(browser, files.html)
    page.close()
    _check_page(facts, problems, images=3)
    hostile = fixtures.HOSTILE
    for key in ("name", "type", "machine", "run_dir"):
        assert hostile[key] in facts["text"], key  # shown exactly as written, quotes and & too
    assert f"training curves of {hostile['run_dir']}" in [i["alt"] for i in facts["images"]]
