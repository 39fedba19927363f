"""Open an HTML report in headless Debian Chromium (Playwright) and check that it really renders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"


def launch(pw):
    """A headless Chromium from /usr/bin/chromium; a missing browser or playwright fails the test, never skips."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it (`bash install.sh --test` runs apt-get install chromium)")
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True)


def check_rendered(browser, path: Path, *, labels: list[str], figures: dict[str, int], shot: Path) -> dict:
    """Load `path`; assert no console/page errors, nothing fetched but the file, each figure id holds an SVG with
    >= the given number of paths and a caption, every run label is in a table header; save a full-page
    screenshot and assert it is not blank. Returns the page's visible text and screenshot stats."""
    from PIL import Image
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    assert errors == []
    assert fetched == [path.resolve().as_uri()], "the page must not load anything else"
    for fid, min_paths in figures.items():
        fig = page.locator(f"figure#{fid}")
        assert fig.count() == 1 and fig.locator("svg").count() == 1, fid
        assert fig.locator("svg path").count() >= min_paths, fid
        assert fig.locator("figcaption").inner_text().strip(), fid
        box = fig.locator("svg").bounding_box()
        assert box["width"] > 300 and box["height"] > 100, (fid, box)
    header = page.locator("table thead").first.inner_text()
    for label in labels:
        assert label in header, (label, header)
    text = page.locator("body").inner_text()
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    img = Image.open(shot).convert("RGB")
    w, h = img.size
    px = np.asarray(img.resize((w // 4, h // 4)), dtype=np.int32).reshape(-1, 3)
    non_white = float((px.sum(axis=1) < 720).mean())
    colours = len(np.unique(px, axis=0))
    assert w >= 1000 and h >= 1500 and non_white > 0.03 and colours > 200, (w, h, non_white, colours)
    return {"text": text, "size": (w, h), "non_white": non_white, "colours": colours}
