"""Registration alone: time per page and how far cells land from where they truly are.

    python benchmarks/bench_register.py [--pages 40]

Forms of each style of formreader.training.synth.FORM_STYLES, filled with MNIST test digits, are
warped by known random homographies (rotation up to 10 degrees, a quarter of them upside down,
scale 0.92-1.08, shift, mild perspective) and blurred and noised as a scan is; the bitonal style
is scanned at twice the template's DPI, thresholded and brought back to it, as the pipeline
does. Each page is registered on one thread. Prints, per style, ms/page and how far the cells'
centres land from where they truly are (median, 99th percentile, worst, in template pixels).

With `--batch N`: also the first N pages of `bench_scale.py` (the samples' form scanned at 200
DPI, its seed), each written into a PDF and read back at the template's DPI as the pipeline
reads it (the JPEG decoded at 6/8 of its size) and registered against
the homography it was scanned with: how far its cells land, and the pages whose worst cell is 1
px or more off with the quality score they were accepted at (a misregistered page that passes
is read wrong, not flagged).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from formreader.pipeline import scale_to_template  # noqa: E402
from formreader.reading.ingest import read_pages, render_pdf_page  # noqa: E402
from formreader.reading.register import RegistrationError, prepare_reference, register_page  # noqa: E402
from formreader.reading.template import load_template  # noqa: E402
from formreader.training.datasets import load_mnist  # noqa: E402
from formreader.training.synth import FORM_STYLES, bitonal, make_pages, scan  # noqa: E402


def warped(page: np.ndarray, rng: np.random.Generator, bitonal_scan: bool) -> tuple[np.ndarray, np.ndarray]:
    """A scan of `page` under a random known homography; returns (scan, page -> scan)."""
    h, w = page.shape
    factor = 2.0 if bitonal_scan else 1.0
    angle = rng.uniform(-10, 10) + (180 if rng.random() < 0.25 else 0)
    m = np.vstack([cv2.getRotationMatrix2D((w / 2, h / 2), angle, rng.uniform(0.92, 1.08)), [0, 0, 1]])
    m[:2, 2] += rng.uniform(-0.03, 0.03, 2) * (w, h) + 0.05 * np.array([w, h])
    m[2, :2] = rng.uniform(-0.01, 0.01, 2) / (w, h)
    m = np.diag([factor, factor, 1.0]) @ m
    paper = rng.uniform(222, 250)
    size = (int(w * 1.1 * factor), int(h * 1.1 * factor))
    out = cv2.warpPerspective(page.astype(np.float32) * paper / 255, m, size, borderValue=paper)
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 0.9) * factor) + rng.normal(0, rng.uniform(2, 6), out.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if bitonal_scan:
        out = cv2.resize(bitonal(out, rng), None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    return out, np.diag([1 / factor, 1 / factor, 1.0]) @ m


def cell_errors(scans, blank: np.ndarray, fields) -> tuple[list[np.ndarray | None], list[float], float]:
    """Register each (scan, template -> scan homography): per page the (cells,) px its cells' centres
    land off (None: not registered) and the quality score; and the ms a page."""
    features = prepare_reference(blank)
    centres = np.float32([[x + w / 2, y + h / 2] for f in fields for x, y, w, h in f.cells]).reshape(-1, 1, 2)
    errors, qualities = [], []
    start = time.perf_counter()
    for image, m in scans:
        try:
            reg = register_page(image, blank, features)
        except RegistrationError:
            errors.append(None)
            qualities.append(0.0)
            continue
        back = cv2.perspectiveTransform(cv2.perspectiveTransform(centres, m), reg.homography)
        errors.append(np.abs(back - centres).max(axis=2).ravel())
        qualities.append(reg.quality)
    return errors, qualities, 1000 * (time.perf_counter() - start) / len(scans)


def summary(errors: list[np.ndarray | None]) -> str:
    e = np.concatenate([x for x in errors if x is not None] or [np.zeros(1)])
    failed = sum(x is None for x in errors)
    spread = f"median {np.median(e):.2f}, p99 {np.percentile(e, 99):.2f}, worst {e.max():.2f}"
    return f"{failed} not registered; cell error px: {spread}"


def batch_pages(pages: int, images: np.ndarray, labels: np.ndarray) -> None:
    """bench_scale.py's pages (its seed, 2027), each written into a PDF as it does and read back as
    the pipeline reads it, against the homography it was scanned with."""
    template = load_template(ROOT / "templates" / "demo_form.yaml")
    _, _, filled = make_pages(pages, 2027, images, labels)
    rng = np.random.default_rng(2027)
    scans = []
    with tempfile.TemporaryDirectory() as folder:
        pdf = Path(folder) / "page.pdf"
        for p in filled:
            image, m = scan(p.image, rng, dpi_scale=200 / 150, with_homography=True)
            Image.fromarray(image).save(pdf, resolution=200.0)
            page = render_pdf_page(next(read_pages(pdf, round(template.dpi), render=False)))
            scaled = scale_to_template(page.image, page.dpi, template)
            # libjpeg decodes by whole eighths of the size, its rows and columns rounded up; pixel
            # centres map as x' = (x + 0.5) * s - 0.5.
            s = round(8 * scaled.shape[1] / image.shape[1]) / 8
            scans.append((scaled, np.array([[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2], [0, 0, 1]]) @ m))
    errors, qualities, ms = cell_errors(scans, template.reference, template.fields)
    print(f"bench_scale.py's first {pages} pages (200 DPI): {ms:.1f} ms/page; {summary(errors)}")
    for k, (e, q) in enumerate(zip(errors, qualities)):
        if e is not None and e.max() >= 1.0:
            print(f"  page {k + 1}: worst cell {e.max():.2f} px off, accepted at quality {q:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--batch", type=int, default=0, help="also register this many of bench_scale.py's pages")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    images, labels = load_mnist("test")
    for style, (line, worn, bitonal_scan, boxes) in FORM_STYLES.items():
        blank, fields, pages = make_pages(args.pages, 99, images, labels, line=line, worn=worn, style=boxes)
        rng = np.random.default_rng(99)
        scans = [warped(p.image, rng, bitonal_scan) for p in pages]
        errors, _, ms = cell_errors(scans, blank, fields)
        print(f"{style}: {len(scans)} pages, {ms:.1f} ms/page; {summary(errors)}")
    if args.batch:
        batch_pages(args.batch, images, labels)

if __name__ == "__main__":
    main()
