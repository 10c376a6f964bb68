"""Field accuracy and review flags, on the shipped samples and on held-out generated forms.

    python benchmarks/evaluate_forms.py [--pages 60] [--seed 777]

Prints, for the samples (samples/truth.csv) and for `--pages` freshly generated scanned forms
(MNIST test digits, a seed the samples and tests do not use): field accuracy, the share of
fields flagged for review, and the number of wrong fields NOT flagged, at the default review
threshold and across a range of thresholds, plus how well field confidence is calibrated.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from formreader.classify import DigitClassifier  # noqa: E402
from formreader.datasets import load_mnist  # noqa: E402
from formreader.fields import DEFAULT_REVIEW_THRESHOLD  # noqa: E402
from formreader.ingest import Page, find_inputs, read_pages  # noqa: E402
from formreader.pipeline import decide_page, page_probabilities, segment_page  # noqa: E402
from formreader.register import RegistrationError, prepare_reference  # noqa: E402
from formreader.synth import make_pages, scan  # noqa: E402
from formreader.template import load_template  # noqa: E402

THRESHOLDS = [0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]


def segment_all(items, template, classifier):
    """items: (page, truth dict). Returns [(segmented page, probabilities, truth)]."""
    features = prepare_reference(template.reference)
    out = []
    for page, truth in items:
        try:
            seg = segment_page(page, template, features)
        except RegistrationError as e:
            print(f"  {page.source} page {page.page}: {e}")
            continue
        out.append((seg, page_probabilities([seg], classifier)[0], truth))
    return out


def score(segmented, template, threshold: float) -> dict:
    rows = []
    for seg, probs, truth in segmented:
        for f in decide_page(seg, probs, template, threshold).fields:
            rows.append((f.value == truth[f.name], f.status != "ok", f.confidence))
    right, flagged, conf = (np.array(c) for c in zip(*rows))
    return {
        "fields": len(rows),
        "accuracy": right.mean(),
        "flagged": flagged.mean(),
        "wrong_unflagged": int((~right & ~flagged).sum()),
        "wrong": int((~right).sum()),
        "accuracy_accepted": right[~flagged].mean() if (~flagged).any() else float("nan"),
        "confidence": conf,
        "right": right,
    }


def report(name: str, segmented, template) -> None:
    base = score(segmented, template, DEFAULT_REVIEW_THRESHOLD)
    print(f"\n{name}: {base['fields']} fields on {len(segmented)} pages")
    print(
        f"  at the default threshold {DEFAULT_REVIEW_THRESHOLD}: field accuracy {base['accuracy']:.2%}, "
        f"{base['flagged']:.1%} flagged for review, {base['wrong_unflagged']} wrong fields NOT flagged "
        f"(of {base['wrong']} wrong)"
    )
    print(f"  {'threshold':>9} {'flagged':>8} {'wrong, not flagged':>19} {'accuracy of accepted':>21}")
    for t in THRESHOLDS:
        s = score(segmented, template, t)
        print(f"  {t:9.2f} {s['flagged']:8.1%} {s['wrong_unflagged']:19d} {s['accuracy_accepted']:21.2%}")
    conf, right = base["confidence"], base["right"]
    print("  field confidence calibration:")
    for lo, hi in [(0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.01)]:
        sel = (conf >= lo) & (conf < hi)
        if sel.any():
            print(
                f"    confidence {lo:.2f}-{min(hi, 1):.2f}: {sel.sum():4d} fields, "
                f"mean confidence {conf[sel].mean():.3f}, right {right[sel].mean():.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()
    template = load_template(ROOT / "templates" / "demo_form.yaml")
    classifier = DigitClassifier.load()

    truth = pd.read_csv(ROOT / "samples" / "truth.csv", dtype={"value": str}, keep_default_na=False)
    by_page = {(f, int(p)): dict(zip(g.field, g.value)) for (f, p), g in truth.groupby(["file", "page"])}
    items = []
    for path in find_inputs([ROOT / "samples" / "scans"]):
        for page in read_pages(path, pdf_dpi=150):
            items.append((page, by_page[(path.name, page.page)]))
    report("Samples (samples/scans)", segment_all(items, template, classifier), template)

    images, labels = load_mnist("test")
    _, _, pages = make_pages(args.pages, args.seed, images, labels)
    rng = np.random.default_rng(args.seed)
    held_out = [
        (
            Page(
                scan(p.image, rng, upside_down=i % 7 == 3, dpi_scale=[1.0, 4 / 3, 2.0][i % 3]),
                150.0 * [1.0, 4 / 3, 2.0][i % 3],
                f"held-out-{i}",
                1,
            ),
            p.values,
        )
        for i, p in enumerate(pages)
    ]
    report(f"Held-out generated forms (seed {args.seed})", segment_all(held_out, template, classifier), template)


if __name__ == "__main__":
    main()
