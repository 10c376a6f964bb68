"""Boxed cells read by the digit model alone, its companion alone, and the two averaged (shipped).

    python benchmarks/compare_readers.py [--model models/digits.keras] [--risk 0.003]

Reads the forms `formreader calibrate` fits on (the model's validation writers) and the nine test
rows of benchmarks/evaluate_forms.py (writers no model trained on) once, and decides their boxed
fields with each reader's probabilities. For each reader, as `formreader calibrate` would make
it: field powers fitted on the validation forms (grey and bitonal apart) and the review threshold
chosen there for at most `--risk` of fields wrong but `ok`. Prints right / flagged / wrong but
`ok` on both at that threshold and at 0.85, and the wrong fields let through when the same share
of fields is flagged (the rules' flags first, then the least confident): how well each reader
ranks its fields, whatever the threshold. Chosen on the validation rows; the test rows recorded.
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

from formreader.reading.classify import REVIEW_RISK, DigitClassifier  # noqa: E402
from formreader.training.evaluate import (  # noqa: E402
    CALIBRATION_PAGES,
    CALIBRATION_SEED,
    boxed_field_records,
    calibration_forms,
    calibration_records,
    fit_field_decision,
    held_out_writers,
)
from formreader.training.synth import FORM_STYLES, scanned_forms  # noqa: E402

SHARES = (0.40, 0.45, 0.50, 0.55, 0.60)


def calibrated(fields: tuple, fitted: dict) -> np.ndarray:
    _, confidence, _, bitonal = fields
    return confidence ** np.where(bitonal, fitted["field_power_bitonal"], fitted["field_power"])


def decided(fields: tuple, confidence: np.ndarray, threshold: float) -> str:
    right, _, rule, _ = fields
    flagged = rule | (confidence < threshold)
    return f"{right.mean():.1%} / {flagged.mean():.1%} / {int((~right & ~flagged).sum())}"


def at_shares(fields: tuple, confidence: np.ndarray) -> str:
    """Wrong fields let through when each share of SHARES is flagged, rule-breakers first."""
    right, _, rule, _ = fields
    order = np.lexsort((confidence, ~rule))
    out = []
    for share in SHARES:
        flagged = np.zeros(len(right), bool)
        flagged[order[: max(int(round(share * len(right))), int(rule.sum()))]] = True
        out.append(str(int((~right & ~flagged).sum())))
    return " / ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="the digit model (.keras), its companion beside it; default: the shipped ones")
    parser.add_argument("--risk", type=float, default=REVIEW_RISK)
    args = parser.parse_args()
    model = DigitClassifier.load(args.model)
    if model.companion is None:
        sys.exit(f"no companion beside {model.path}")
    readers = {
        "the digit model alone": model.probabilities,
        "the companion alone": model.companion.probabilities,
        "the two averaged": model.cell_probabilities,
    }
    validation, sources = calibration_records(calibration_forms(model.meta, CALIBRATION_PAGES, CALIBRATION_SEED), readers)
    test_sets = []
    for images, labels in held_out_writers().values():
        test_sets += [scanned_forms(style, images, labels, 40, 777) for style in FORM_STYLES]
    test = boxed_field_records(test_sets, readers)
    print(f"Boxed fields: {len(validation['the two averaged'][0])} of the model's validation writers (chosen on), "
          f"{len(test['the two averaged'][0])} of writers no model trained on (recorded); right / flagged / wrong but ok")
    for name in readers:
        fitted = fit_field_decision(*validation[name], args.risk, sources)
        val_conf, test_conf = calibrated(validation[name], fitted), calibrated(test[name], fitted)
        threshold = fitted["review_threshold"]
        print(f"\n{name}: field powers {fitted['field_power']:.3f} grey, {fitted['field_power_bitonal']:.3f} bitonal")
        print(f"  threshold for {args.risk:.1%} ({threshold:.3f}): validation {decided(validation[name], val_conf, threshold)}, "
              f"test {decided(test[name], test_conf, threshold)}")
        print(f"  threshold 0.85: validation {decided(validation[name], val_conf, 0.85)}, "
              f"test {decided(test[name], test_conf, 0.85)}")
        shares = " / ".join(f"{s:.0%}" for s in SHARES)
        print(f"  wrong but ok at {shares} flagged: validation {at_shares(validation[name], val_conf)}, "
              f"test {at_shares(test[name], test_conf)}")


if __name__ == "__main__":
    main()
