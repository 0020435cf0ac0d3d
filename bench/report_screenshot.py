"""Render a `webdistill report` page in headless Chromium (Debian's `chromium`) and cut it into
screen-sized PNGs, to look at it as a user would.

    python bench/report_screenshot.py report.html --out shots/ [--width 1280] [--height 900]

Writes shots/full.png (the whole page) and shots/page-00.png, page-01.png, ... (one screen each).
Exits 3 when no Chromium is installed. The page has no script and no external link, so the
browser runs with networking off.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "chrome")
TALL = 20000  # the window's height for the full-page shot; the blank rest is cut off


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUMS) if p), None)


def screenshot(page: Path, png: Path, width: int, height: int = TALL) -> Path:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                        f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=180)
    return png


def trim(png: Path) -> Image.Image:
    """The page without the blank window below its end."""
    im = Image.open(png).convert("RGB")
    rows = np.asarray(im).std(axis=(1, 2)) > 0
    last = int(np.flatnonzero(rows)[-1]) + 20 if rows.any() else im.height
    return im.crop((0, 0, im.width, min(last, im.height)))


def split(im: Image.Image, out: Path, height: int) -> list[Path]:
    pages = []
    for i, top in enumerate(range(0, im.height, height)):
        path = out / f"page-{i:02d}.png"
        im.crop((0, top, im.width, min(top + height, im.height))).save(path, optimize=True)
        pages.append(path)
    return pages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path, help="the report's HTML file")
    ap.add_argument("--out", type=Path, default=Path("report-shots"), help="folder for the PNGs")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900, help="one screen's height")
    args = ap.parse_args(argv)
    if find_chromium() is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    full = trim(screenshot(args.page, args.out / "full.png", args.width))
    full.save(args.out / "full.png", optimize=True)
    pages = split(full, args.out, args.height)
    print(f"{args.out / 'full.png'} ({full.width}x{full.height}) and {len(pages)} screens in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
