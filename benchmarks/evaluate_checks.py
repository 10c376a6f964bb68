"""Free-written numbers: string and digit accuracy on the sample checks and on held-out checks.

    python benchmarks/evaluate_checks.py [--checks 60] [--seed 555]

Reads samples/checks (truth in samples/checks_truth.csv) through the whole pipeline, and
`--checks` freshly generated scanned checks (MNIST test digits, a seed the samples do not use).
Prints string accuracy (every digit right), digit accuracy (digits of the truth found in order,
by alignment), separator accuracy (the raw reading equal to what was written), the share of
fields flagged for review and the number of wrong strings NOT flagged.
"""

from __future__ import annotations

import argparse
import difflib
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
from formreader.ingest import Page, find_inputs, read_pages  # noqa: E402
from formreader.pipeline import read_page  # noqa: E402
from formreader.register import prepare_reference  # noqa: E402
from formreader.synth import make_checks, scan  # noqa: E402
from formreader.template import load_template  # noqa: E402


def score(results: list[tuple[str, str, str, str, str]]) -> None:
    """results: (truth value, truth raw, read value, read raw, status)."""
    strings = np.mean([tv == rv for tv, _, rv, _, _ in results])
    found = sum(sum(b.size for b in difflib.SequenceMatcher(None, tv, rv).get_matching_blocks()) for tv, _, rv, _, _ in results)
    digits = found / sum(len(tv) for tv, *_ in results)
    raw = np.mean([tr == rr for _, tr, _, rr, _ in results])
    flagged = np.mean([s != "ok" for *_, s in results])
    wrong_unflagged = sum(tv != rv and s == "ok" for tv, _, rv, _, s in results)
    wrong = sum(tv != rv for tv, _, rv, _, _ in results)
    print(f"  {len(results)} fields: string accuracy {strings:.1%}, digit accuracy {digits:.1%}, raw (with separators) {raw:.1%}")
    print(f"  {flagged:.1%} flagged for review; {wrong_unflagged} wrong strings NOT flagged (of {wrong} wrong)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=60)
    parser.add_argument("--seed", type=int, default=555)
    args = parser.parse_args()
    template = load_template(ROOT / "templates" / "bank_check.yaml")
    classifier = DigitClassifier.load()
    features = prepare_reference(template.reference)

    truth = pd.read_csv(ROOT / "samples" / "checks_truth.csv", dtype=str, keep_default_na=False)
    expected = {(r.file, int(r.page), r.field): (r.value, r.raw) for r in truth.itertuples()}
    results = []
    for path in find_inputs([ROOT / "samples" / "checks"]):
        for page in read_pages(path, pdf_dpi=150):
            read = read_page(page, template, classifier, features)
            for f in read.fields:
                results.append((*expected[(path.name, page.page, f.name)], f.value, f.raw, f.status))
    print("Sample checks (samples/checks):")
    score(results)

    images, labels = load_mnist("test")
    _, _, checks = make_checks(args.checks, args.seed, images, labels)
    rng = np.random.default_rng(args.seed)
    results = []
    for i, (page, values) in enumerate(checks):
        image = scan(page, rng, max_rotation=5, upside_down=i % 9 == 4)
        read = read_page(Page(image, 150.0, f"held-out-{i}", 1), template, classifier, features)
        for f in read.fields:
            raw = values[f.name]
            results.append(("".join(c for c in raw if c.isdigit()), raw, f.value, f.raw, f.status))
    print(f"Held-out generated checks (seed {args.seed}):")
    score(results)


if __name__ == "__main__":
    main()
