"""The experts report's report.html in a real browser (Debian's Chromium, headless, driven by playwright), opened
from disk with the network blocked: no console error or page error, no request but the file itself, every image
decoded with a size, and a screenshot of each plot that is not one flat colour."""
from __future__ import annotations

import io
import json
import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
if not CHROMIUM:
    pytest.skip("no chromium browser (/usr/bin/chromium, the Debian package chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the python package playwright is not installed")

from moelm.cli import main  # noqa: E402
from moelm.models.scaffold import new_checkpoint  # noqa: E402

ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server"]


def colours(png: bytes) -> int:
    """Distinct colours in a PNG screenshot (matplotlib reads it back)."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0))


def test_report_page_in_chromium(tmp_path, capsys):
    path = new_checkpoint("phimoe-tiny", tmp_path / "m", seed=0)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"Item {i} of the list, key {i * 3}."}) + "\n" for i in range(30)))
    out = tmp_path / "report"
    for target, extra in ((tmp_path / "before", []), (out, ["--compare", str(tmp_path / "before")])):
        assert main(["experts", str(path), "--data", str(text), "--out", str(target), "--seq-length", "24",
                     "--no-progress", *extra]) == 0
    capsys.readouterr()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.route("http*://**", lambda route: route.abort())
            page.goto((out / "report.html").as_uri(), wait_until="load")
            images = page.locator("img")
            assert images.count() == 4  # load, balance, co-activation, comparison
            for i in range(images.count()):
                img = images.nth(i)
                size = img.evaluate("e => [e.complete, e.naturalWidth, e.naturalHeight]")
                assert size[0] and size[1] > 100 and size[2] > 100, (img.get_attribute("alt"), size)
                assert colours(img.screenshot()) > 20, img.get_attribute("alt")
            assert page.locator("table").count() == 3
            assert "Experts report" in page.title() + page.inner_text("h1")
            assert problems == []
            assert requests == [(out / "report.html").as_uri()]
        finally:
            browser.close()
