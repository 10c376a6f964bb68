"""Regenerate the demo form, the bank check, their templates and the sample scans, deterministically.

    python samples/make_samples.py [--mnist DIR]

Writes templates/demo_form.png and .yaml (the blank form and its template), samples/scans/
(ten filled pages as PDF, bilevel TIFF, PNG and JPEG, scanned crooked, noisy, two upside down)
and samples/truth.csv (what was written in every field); templates/bank_check.png and .yaml,
samples/checks/ (eight checks with amounts and dates written freely: touching digits, broken
strokes, separators, a guide line, a patterned background) and samples/checks_truth.csv.
The handwriting is MNIST test-split digits, which the model never trains on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from formreader.reading.template import template_yaml
from formreader.training.datasets import load_mnist
from formreader.training.synth import DPI, make_checks, make_pages, scan

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261124
FIXED_DATE = time.strptime("2026-01-01", "%Y-%m-%d")  # PDFs carry a date; a fixed one keeps them identical

CHECKS = {
    "checks_a.pdf": [(False, 1.0), (False, 1.0), (True, 1.0), (False, 1.0)],
    "check_b.png": [(False, 4 / 3)],
    "check_c.jpg": [(False, 1.0)],
    "check_d.tif": [(False, 1.0), (False, 1.0)],
}

# file name -> list of (upside down, resolution factor) per page
LAYOUT = {
    "batch_a.pdf": [(False, 1.0), (False, 1.0), (True, 1.0), (False, 1.0)],
    "fax_b.tif": [(False, 1.0), (False, 1.0), (False, 1.0)],
    "scan_c.png": [(False, 4 / 3)],
    "phone_d.jpg": [(False, 1.0)],
    "scan_e.jpg": [(True, 2.0)],
}


def write_samples(out_root: Path = ROOT, mnist_dir: Path | None = None, seed: int = SEED) -> Path:
    """Write the template, scans and truth under out_root; returns the truth CSV's path."""
    images, labels = load_mnist("test", mnist_dir)
    n_pages = sum(len(v) for v in LAYOUT.values())
    blank, fields, pages = make_pages(n_pages, seed, images, labels)
    rng = np.random.default_rng(seed + 1)

    templates = out_root / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blank).save(templates / "demo_form.png", dpi=(DPI, DPI))
    (templates / "demo_form.yaml").write_text(template_yaml(fields, "demo_form.png", DPI, "demo_form"))

    forms = [(p.image, p.values) for p in pages]
    truth = _write_scans(out_root / "samples" / "scans", LAYOUT, forms, rng, max_rotation=10, bilevel=True)
    truth_path = out_root / "samples" / "truth.csv"
    pd.DataFrame(truth).drop(columns="raw").to_csv(truth_path, index=False)

    blank, fields, checks = make_checks(sum(len(v) for v in CHECKS.values()), seed + 2, images, labels)
    Image.fromarray(blank).save(templates / "bank_check.png", dpi=(DPI, DPI))
    (templates / "bank_check.yaml").write_text(template_yaml(fields, "bank_check.png", DPI, "bank_check"))
    truth = _write_scans(out_root / "samples" / "checks", CHECKS, checks, rng, max_rotation=5, bilevel=False)
    pd.DataFrame(truth).to_csv(out_root / "samples" / "checks_truth.csv", index=False)
    return truth_path


def _write_scans(
    folder: Path, layout: dict, items: list, rng: np.random.Generator, max_rotation: float, bilevel: bool
) -> list[dict]:
    """Scan filled pages (image, {field: raw value}) into the files of `layout`; the truth rows."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = []
    it = iter(items)
    for name, pages in layout.items():
        frames = []
        for number, (upside_down, factor) in enumerate(pages, start=1):
            image, values = next(it)
            frames.append((scan(image, rng, max_rotation=max_rotation, upside_down=upside_down, dpi_scale=factor), DPI * factor))
            for field, raw in values.items():
                truth.append(
                    {"file": name, "page": number, "field": field, "value": "".join(c for c in raw if c.isdigit()), "raw": raw}
                )
        _save(folder / name, frames, bilevel)
    return truth


def _save(path: Path, frames: list[tuple[np.ndarray, float]], bilevel: bool = True) -> None:
    imgs = [Image.fromarray(a) for a, _ in frames]
    dpi = frames[0][1]
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        imgs[0].save(
            path, save_all=True, append_images=imgs[1:], resolution=dpi, quality=80, creationDate=FIXED_DATE, modDate=FIXED_DATE
        )
    elif suffix == ".tif" and not bilevel:
        imgs[0].save(path, save_all=True, append_images=imgs[1:], compression="tiff_deflate", dpi=(dpi, dpi))
    elif suffix == ".tif":
        # A fax-style scan: 1 bit per pixel, CCITT group 4.
        bilevel = [i.point(lambda v: 255 if v > 150 else 0).convert("1") for i in imgs]
        bilevel[0].save(path, save_all=True, append_images=bilevel[1:], compression="group4", dpi=(dpi, dpi))
    elif suffix == ".png":
        imgs[0].save(path, dpi=(dpi, dpi), optimize=True)
    else:
        imgs[0].save(path, quality=75, dpi=(round(dpi), round(dpi)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, help="folder with the MNIST IDX files")
    args = parser.parse_args()
    print(f"wrote {write_samples(ROOT, args.mnist)}")
