"""Registration alone: time per page and how far cells land from where they truly are.

    python benchmarks/bench_register.py [--pages 40]

Forms of each style of formreader.training.synth.FORM_STYLES, filled with MNIST test digits, are
warped by known random homographies (rotation up to 10 degrees, a quarter of them upside down,
scale 0.92-1.08, shift, mild perspective) and blurred and noised as a scan is; the bitonal style
is scanned at twice the template's DPI, thresholded and brought back to it, as the pipeline
does. Each page is registered on one thread. Prints, per style, ms/page and how far the cells'
centres land from where they truly are (median, 99th percentile, worst, in template pixels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from formreader.reading.register import RegistrationError, prepare_reference, register_page  # noqa: E402
from formreader.training.datasets import load_mnist  # noqa: E402
from formreader.training.synth import FORM_STYLES, bitonal, make_pages  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=40)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    images, labels = load_mnist("test")
    for style, (line, worn, bitonal_scan, boxes) in FORM_STYLES.items():
        blank, fields, pages = make_pages(args.pages, 99, images, labels, line=line, worn=worn, style=boxes)
        rng = np.random.default_rng(99)
        scans = [warped(p.image, rng, bitonal_scan) for p in pages]
        features = prepare_reference(blank)
        centres = np.float32([[x + w / 2, y + h / 2] for f in fields for x, y, w, h in f.cells]).reshape(-1, 1, 2)
        errors, failed = [], 0
        start = time.perf_counter()
        for image, m in scans:
            try:
                reg = register_page(image, blank, features)
            except RegistrationError:
                failed += 1
                continue
            back = cv2.perspectiveTransform(cv2.perspectiveTransform(centres, m), reg.homography)
            errors.append(np.abs(back - centres).max(axis=2).ravel())
        elapsed = time.perf_counter() - start
        e = np.concatenate(errors) if errors else np.zeros(1)
        print(f"{style}: {len(scans)} pages, {failed} not registered, {1000 * elapsed / len(scans):.1f} ms/page; "
              f"cell error px: median {np.median(e):.2f}, p99 {np.percentile(e, 99):.2f}, worst {e.max():.2f}")

if __name__ == "__main__":
    main()
