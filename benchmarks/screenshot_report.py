"""Render an HTML report (report.html, compare.html, gradvar.html) to a full-page PNG in headless
Chromium, to look at it: nothing cut off, legible axes, no overlapping labels. Not run in CI.

    python benchmarks/screenshot_report.py runs/quickstart/distilled/report.html [--out shot.png]

Needs a Chromium. With the ``playwright`` package (``pip install playwright``) it drives the
browser through Playwright and takes a full-page screenshot; Playwright's own browser download
needs network access, so the script prefers a system Chromium (on Debian/Ubuntu:
``apt-get install chromium``) and passes it as Playwright's executable. Without Playwright it runs
that Chromium's own ``--headless --screenshot`` with a tall window.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def with_playwright(page_url: str, out: Path, width: int, executable: str | None) -> bool:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(page_url)
        page.wait_for_load_state("load")
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return True


def with_cli(page_url: str, out: Path, width: int, height: int, executable: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                page_url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write (default: beside the HTML, .png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=7000, help="window height without Playwright")
    args = parser.parse_args()
    if not args.html.is_file():
        print(f"no such file: {args.html}", file=sys.stderr)
        return 2
    out = args.out or args.html.with_suffix(".png")
    url = args.html.resolve().as_uri()
    executable = find_chromium()
    if with_playwright(url, out, args.width, executable):
        how = "playwright"
    elif executable is not None:
        with_cli(url, out, args.width, args.height, executable)
        how = "chromium --headless"
    else:
        print("no Chromium found: apt-get install chromium (or pip install playwright)", file=sys.stderr)
        return 2
    print(f"{out} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
