"""Templates made by `template detect`, on blank forms of every printed box style.

    python benchmarks/evaluate_templates.py [--pages 20] [--seed 404]

For each style of formreader.training.synth.BOX_STYLES (marked "held out": never tuned on; the
history of the others is told there), the demo form's blank is printed in that style and given
to `propose_template`. Prints the share of the
boxes found exactly (each side within 2 px) and of the fields grouped exactly as printed; then
reads `--pages` scanned forms of that style (MNIST test digits) with the hand-written template
and with the detected one (its fields given the hand-written names and rules, as a person does
after detect), and prints field accuracy, flagged and wrong but ok for both. Last, a mixed batch:
`--pages` scanned pages of each of three forms (the demo form, the check, the free-field form)
and of an unknown one (an invoice), each read as the form it matches (`match_form`); prints how
many pages went to their own form and how many unknown ones became error rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from formreader.pipeline import read_page, segment_page  # noqa: E402
from formreader.reading.classify import DigitClassifier  # noqa: E402
from formreader.reading.ingest import Page  # noqa: E402
from formreader.reading.register import RegistrationError, prepare_reference  # noqa: E402
from formreader.reading.template import Template, propose_template  # noqa: E402
from formreader.training.datasets import load_mnist  # noqa: E402
from formreader.training.synth import (  # noqa: E402
    BOX_STYLES,
    DPI,
    blank_form,
    invoice_form,
    make_checks,
    make_pages,
    printed_as,
    scan,
    scanned_free_forms,
)

HELD_OUT = ("dropout", "hanging ticks")  # never tuned on (see formreader.training.synth.BOX_STYLES)


def near(a, b, px: int = 2) -> bool:
    return all(abs(u - v) <= px for u, v in zip(a, b))


def detected_template(blank: np.ndarray, truth: list) -> tuple[Template, float, float]:
    """The detected template (fields matched to the hand-written ones take their names and
    rules), the share of boxes found and of fields grouped exactly."""
    proposed, _ = propose_template(blank, DPI)
    cells = [c for f in proposed for c in f.cells]
    boxes = [c for f in truth for c in f.cells]
    found = sum(any(near(b, c) for c in cells) for b in boxes) / len(boxes)
    fields, grouped = [], 0
    for p in proposed:
        match = next((t for t in truth if len(t.cells) == len(p.cells) and all(map(near, t.cells, p.cells))), None)
        grouped += match is not None
        fields.append(replace(match, cells=p.cells) if match else p)
    return Template("detected", blank, float(DPI), tuple(fields)), found, grouped / len(truth)


def read_all(template: Template, items: list) -> tuple[float, float, float, float]:
    """Shares of the fields written: right, flagged, wrong but ok, and not in the template at
    all (a detected template that did not group a field as printed)."""
    features = prepare_reference(template.reference)
    right = flagged = wrong_ok = missing = total = 0
    for page, truth in items:
        read = {f.name: f for f in read_page(page, template, CLASSIFIER, features).fields}
        for name, value in truth.items():
            total += 1
            f = read.get(name)
            missing += f is None
            right += f is not None and f.value == value
            flagged += f is not None and f.status != "ok"
            wrong_ok += f is not None and f.value != value and f.status == "ok"
    return right / total, flagged / total, wrong_ok / total, missing / total


def main() -> None:
    global CLASSIFIER
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--seed", type=int, default=404)
    parser.add_argument("--tuning", action="store_true", help="leave the held-out styles out (while working on the detector)")
    args = parser.parse_args()
    CLASSIFIER = DigitClassifier.load()
    images, labels = load_mnist("test")
    plain, truth = blank_form()
    print(f"Templates detected on the demo form printed in each style; {args.pages} scanned forms each (MNIST test digits)")
    columns = f"{'read with':10s}{'right':>8s}{'flagged':>9s}{'wrong, ok':>11s}{'missing':>9s}"
    print(f"{'style':26s}{'boxes found':>12s}{'fields grouped':>16s}   {columns}")
    for style in BOX_STYLES if not args.tuning else [s for s in BOX_STYLES if s not in HELD_OUT]:
        blank = printed_as(plain, truth, style)
        detected, found, grouped = detected_template(blank, truth)
        _, _, pages = make_pages(args.pages, args.seed, images, labels, style=style)
        rng = np.random.default_rng(args.seed)
        items = [(Page(scan(p.image, rng), float(DPI), f"{style}-{i}", 1), p.values) for i, p in enumerate(pages)]
        label = style + (" (held out)" if style in HELD_OUT else "")
        by_hand = Template("hand", blank, float(DPI), tuple(truth))
        for k, (name, template) in enumerate((("by hand", by_hand), ("detected", detected))):
            right, flagged, wrong_ok, missing = read_all(template, items)
            head = f"{label:26s}{found:12.1%}{grouped:16.1%}" if k == 0 else " " * 54
            print(f"{head}   {name:10s}{right:8.1%}{flagged:9.1%}{wrong_ok:11.2%}{missing:9.1%}")
    mixed_batch(args.pages, args.seed, images, labels)


def mixed_batch(pages: int, seed: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Pages of three forms and of an unknown one, each matched to the form it is."""
    import time

    rng = np.random.default_rng(seed)
    form, form_fields, filled = make_pages(pages, seed, images, labels)
    check, check_fields, checks = make_checks(pages, seed, images, labels)
    free, returns = scanned_free_forms(images, labels, pages, seed)
    templates = [
        Template("demo_form", form, float(DPI), tuple(form_fields)),
        Template("bank_check", check, float(DPI), tuple(check_fields)),
        free,
    ]
    batch = [(Page(scan(p.image, rng), float(DPI), "form", 1), "demo_form") for p in filled]
    batch += [(Page(scan(c, rng), float(DPI), "check", 1), "bank_check") for c, _ in checks]
    batch += [(p, "free_form") for p, _ in returns]
    batch += [(Page(scan(invoice_form(), rng), float(DPI), "invoice", 1), None) for _ in range(pages)]
    features = [prepare_reference(t.reference) for t in templates]
    right = refused = 0
    start = time.perf_counter()
    for page, form_name in batch:
        try:
            right += segment_page(page, templates, features).template == form_name
        except RegistrationError as e:
            refused += form_name is None and "matches no template" in str(e)
    ms = 1000 * (time.perf_counter() - start) / len(batch)
    print(f"\nMixed batch: {3 * pages} pages of three forms and {pages} of an unknown one, {ms:.0f} ms a page to match "
          f"and read: {right} of {3 * pages} read as their own form, {refused} of {pages} unknown ones error rows "
          "('matches no template')")


CLASSIFIER: DigitClassifier


if __name__ == "__main__":
    main()
