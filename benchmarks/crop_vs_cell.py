"""Where a held-out writer's digit is lost between its crop and a form's box.

Each digit written into generated scanned forms (as `evaluate_forms.py` writes them: the same
forms, seed and writers) is followed to the cell it was written into: read there as the page's
boxed cells are (registered, cut, segmented, both networks), and read as its own crop through
`read_digits` (as `formreader evaluate` reads it). Prints, per source of writers and form, how
many digits were followed (those of fields read with as many digits as were written), the share
read right each way, how many only one way read right, and the commonest misreads of the digits
read right as a crop and wrong as a cell.

    python benchmarks/crop_vs_cell.py [--pages 40] [--seed 777] [--style "samples' form"] [--model M]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from formreader.api import read_digits  # noqa: E402
from formreader.pipeline import page_probabilities, segment_page  # noqa: E402
from formreader.reading.classify import NOT_A_DIGIT, DigitClassifier  # noqa: E402
from formreader.reading.register import RegistrationError, prepare_reference  # noqa: E402
from formreader.training.evaluate import held_out_digits  # noqa: E402
from formreader.training.synth import FORM_STYLES, glyphs_of, scanned_as, written_forms  # noqa: E402

SOURCES = ("MNIST test", "CVL validation writers", "NSYSU exam boxes")


def followed(crops: list, labels: np.ndarray, mnist: bool, style: str, pages: int, seed: int, classifier) -> tuple[list, int]:
    """Each digit written into `pages` forms of `style`: (crop index, digit written, digit read in
    its cell, that cell's confidence), for the fields whose cells found as many digits as were
    written; and the number of fields that did not. `mnist`: the crops are MNIST's, written as
    its 28x28 images are (held_out_writers), not as glyphs of their ink."""
    if mnist:
        images, index = np.stack([255 - c for c in crops]), np.arange(len(crops))
    else:
        images, index = glyphs_of(crops)
    template, filled = written_forms(style, images, labels[index], pages, seed)
    features = prepare_reference(template.reference)
    rows, miscounted = [], 0
    for scanned, page in zip(scanned_as(style, filled, seed), filled):
        try:
            seg = segment_page(scanned, template, features)
        except RegistrationError:
            continue
        probs = iter(page_probabilities(seg, classifier))
        for spec, cells in zip(template.fields, seg.segments):
            found = [next(probs) for cell in cells if cell.image is not None]
            drawn = [index[k] for k in page.drawn[spec.name]]
            if len(found) != len(drawn):
                miscounted += 1
                continue
            rows += [(k, int(labels[k]), int(p.argmax()), float(p.max())) for k, p in zip(drawn, found)]
    return rows, miscounted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=40, help="generated pages per source")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--style", default=list(FORM_STYLES)[0], choices=list(FORM_STYLES))
    parser.add_argument("--model", type=Path, help="the digit model (.keras); default: the shipped one")
    args = parser.parse_args()
    classifier = DigitClassifier.load(args.model)
    sets = held_out_digits()
    print(f"Held-out digits on {args.style!r} ({args.pages} pages, seed {args.seed}), each read as its crop and as its cell:")
    print(f"  {'digits of':<26} {'followed':>8} {'crop right':>10} {'cell right':>10} {'crop only':>9} {'cell only':>9}"
          f" {'fields miscounted':>17}")
    for name in SOURCES:
        if name not in sets:
            print(f"  {name}: not found, left out")
            continue
        crops, labels = sets[name]
        rows, miscounted = followed(crops, labels, name == "MNIST test", args.style, args.pages, args.seed, classifier)
        crop_read = read_digits([crops[k] for k, *_ in rows])
        as_crop = np.array([r.digit == str(truth) for r, (_, truth, _, _) in zip(crop_read, rows)])
        as_cell = np.array([read == truth for _, truth, read, _ in rows])
        print(f"  {name:<26} {len(rows):>8} {as_crop.mean():>10.2%} {as_cell.mean():>10.2%} {(as_crop & ~as_cell).sum():>9}"
              f" {(~as_crop & as_cell).sum():>9} {miscounted:>17}")
        lost = Counter((truth, read) for (_, truth, read, _), a, b in zip(rows, as_crop, as_cell) if a and not b)
        if lost:
            commonest = ", ".join(f"{a}->{'?' if b == NOT_A_DIGIT else b} {n}" for (a, b), n in lost.most_common(5))
            print(f"  {'':<26} right as a crop, misread as a cell, commonest: {commonest}")


if __name__ == "__main__":
    main()
