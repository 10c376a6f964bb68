"""What a field's rules are worth: boxed dates with their pattern and card numbers with their
check digit, read with and without the rule.

    python benchmarks/evaluate_rules.py [--fields 500] [--seed 41]

Fields are put together from the digit crops of writers no model trained on (MNIST test, CVL's
validation writers, NSYSU exam boxes, ORAND's test checks; `evaluate.held_out_digits`), each crop
segmented and read as a form's boxed cell (DigitClassifier.cell_probabilities), and decided by
`fields.read_field` at the model's review threshold and grey-scan field power: once as the demo
form's date (`pattern`) or a 16-digit card number (`check: luhn`), once as plain digits of the
same length. Prints, per source and kind: fields right, flagged, and wrong but `ok`.
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

from formreader.reading.classify import DigitClassifier, reading_from_probabilities  # noqa: E402
from formreader.reading.fields import luhn_valid, read_field  # noqa: E402
from formreader.reading.segment import segment_crops  # noqa: E402
from formreader.reading.template import Field, load_template  # noqa: E402
from formreader.training.evaluate import held_out_digits  # noqa: E402


def random_numbers(kind: str, n: int, rng: np.random.Generator) -> list[str]:
    """`n` dates (ddmmyyyy, days that exist in every month, years 1950-2029) or Luhn-valid
    16-digit card numbers."""
    if kind == "date":
        return [f"{rng.integers(1, 29):02d}{rng.integers(1, 13):02d}{rng.integers(1950, 2030)}" for _ in range(n)]
    numbers = []
    for _ in range(n):
        body = "".join(map(str, rng.integers(0, 10, 15)))
        numbers.append(next(body + str(c) for c in range(10) if luhn_valid(body + str(c))))
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fields", type=int, default=500, help="fields per source and kind")
    parser.add_argument("--seed", type=int, default=41)
    args = parser.parse_args()
    classifier = DigitClassifier.load()
    threshold, power = classifier.review_threshold, classifier.field_power(False)
    date = next(f for f in load_template(ROOT / "templates" / "demo_form.yaml").fields if f.name == "date")
    card = Field("card", tuple((40 * i, 0, 36, 36) for i in range(16)), length=16, check="luhn")
    ruled = {"date (pattern)": date, "card number (check: luhn)": card}
    print(f"Fields of held-out writers' digit crops, threshold {threshold}, field power {power} ({args.fields} a row):")
    print(f"  {'digits of':24} {'field':28} {'rule':>5} {'right':>7} {'flagged':>8} {'wrong but ok':>13}")
    for source, (crops, labels) in held_out_digits().items():
        if "tight" in source:
            continue
        images, index = segment_crops(crops)
        probabilities = classifier.cell_probabilities(images)
        by_digit = {d: np.flatnonzero(labels[index] == d) for d in range(10)}
        rng = np.random.default_rng(args.seed)
        for name, spec in ruled.items():
            numbers = random_numbers("date" if spec is date else "card", args.fields, rng)
            cells = [[reading_from_probabilities(probabilities[rng.choice(by_digit[int(d)])]) for d in n] for n in numbers]
            for rule, field in (("no", replace(spec, pattern="", check="")), ("yes", spec)):
                read = [read_field(field, c, threshold, power) for c in cells]
                right = np.array([r.value == number for r, number in zip(read, numbers)])
                ok = np.array([r.status == "ok" for r in read])
                print(f"  {source:24} {name:28} {rule:>5} {right.mean():7.1%} {1 - ok.mean():8.1%} "
                      f"{(ok & ~right).mean():8.2%} ({int((ok & ~right).sum())})")


if __name__ == "__main__":
    main()
