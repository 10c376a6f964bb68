"""Field accuracy and review flags, on the shipped samples and on held-out generated forms.

    python benchmarks/evaluate_forms.py [--pages 40] [--seed 777] [--validation] [--details] [--model M] [--dithered] [--fax]

Prints, for the samples (samples/truth.csv): field accuracy, the share of fields flagged for
review and the wrong fields NOT flagged, across a range of thresholds, and how well field
confidence is calibrated. Then a table for forms generated (a seed the samples and tests do not
use) and filled by writers no model trained on (MNIST test, CVL validation writers, NSYSU exam
boxes), on three forms: the samples', one with thick, worn borders scanned bitonal at 300 DPI
and one whose boxes are short ticks, with the share of their cells read right (of the fields read
with as many digits as were written) and each source's commonest misreads; then how often their
fields are right at each confidence. Then CVL's held-out writers on the three forms, each page
filled by one writer as forms are (the nine rows' pages draw each cell from any writer of their
source: MNIST's and NSYSU's writers are not known).
Last, MNIST's and CVL's writers on the first two forms writing digits taller than the boxes
(synth.LARGE_WRITING, crossing their lines) and smaller (synth.SMALL_WRITING, a third to a half of
the box), and pages with a digit struck through (synth.strike_out; how many of those fields
went out `ok`, which they must not): weaknesses shown beside the nine rows. With --validation, first the same table for the
forms of the model's own validation writers (`formreader calibrate`'s forms), and their MNIST
digits and CVL writers writing across the lines and small: the figures a model is chosen on, the
test rows never. With --dithered, only the samples, then
their grey pages dithered as a bitonal scanner's halftone mode dithers them, read as they are and
with their dots taken for ink. With --fax, only MNIST's and CVL's held-out writers on the samples'
form, as scanned and as the same pages come by fax (synth.as_fax, standard and fine mode, each
saved as a Group 3 TIFF and read back from the file).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from formreader import pipeline  # noqa: E402
from formreader.pipeline import decide_page, mark_struck, page_probabilities, segment_page  # noqa: E402
from formreader.reading.classify import REVIEW_RISKS, DigitClassifier  # noqa: E402
from formreader.reading.ingest import find_inputs, is_bitonal, read_pages  # noqa: E402
from formreader.reading.register import RegistrationError, prepare_reference  # noqa: E402
from formreader.reading.template import load_template  # noqa: E402
from formreader.training.evaluate import calibration_error, held_out_writers, rate_interval  # noqa: E402
from formreader.training.synth import (  # noqa: E402
    FAX_MODES,
    FORM_STYLES,
    LARGE_WRITING,
    SMALL_WRITING,
    as_fax,
    scanned_forms,
    writer_glyphs,
)

THRESHOLDS = [0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]
# Writing of other sizes than the nine rows': (share of the box's height, what it does).
WRITING_SIZES = [(LARGE_WRITING, "crossing its lines"), (SMALL_WRITING, "written small")]


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
        mark_struck(seg, classifier.struck)
        out.append((seg, page_probabilities(seg, classifier), truth))
    return out


def score(segmented, template, threshold: float, classifier) -> dict:
    rows = []
    misread: Counter = Counter()  # (digit written, digit read) of the cells read as another digit
    cells = cells_right = miscounted = 0
    struck_ok = []  # fields with a digit struck through (their truth None): whether each went out `ok`
    strike_alone = 0  # fields sent to review by the struck-digit detector alone
    for seg, probs, truth in segmented:
        power = classifier.field_power(seg.bitonal)
        for f in decide_page(seg, probs, template, threshold, power, detector=classifier.struck).fields:
            written = truth[f.name]
            if written is None:
                struck_ok.append(f.status == "ok")
                continue
            rows.append((f.value == written, f.status != "ok", f.confidence))
            strike_alone += len(f.reasons) == 1 and "struck through?" in f.reasons[0]
            # The cells, where a digit was read for each one written (their order is the field's):
            # a digit misread, as against a digit lost, split or added (a field miscounted).
            if len(f.value) != len(written):
                miscounted += 1
                continue
            cells += len(written)
            cells_right += sum(a == b for a, b in zip(written, f.value))
            misread.update((a, b) for a, b in zip(written, f.value) if a != b)
    right, flagged, conf = (np.array(c) for c in zip(*rows))
    return {
        "cells": cells,
        "cells_right": cells_right,
        "miscounted": miscounted,
        "misread": misread,
        "fields": len(rows),
        "accuracy": right.mean(),
        "flagged": flagged.mean(),
        "wrong_unflagged": int((~right & ~flagged).sum()),
        "wrong": int((~right).sum()),
        "accuracy_accepted": right[~flagged].mean() if (~flagged).any() else float("nan"),
        "confidence": conf,
        "right": right,
        "struck": len(struck_ok),
        "struck_ok": int(sum(struck_ok)),
        "strike_alone": strike_alone,
    }


def read_at_threshold(items, template, classifier: DigitClassifier) -> dict:
    """`score` of pages [(page, truth)] read as one template, at the model's review threshold."""
    return score(segment_all(items, template, classifier), template, classifier.review_threshold, classifier)


def report(name: str, segmented, template, classifier) -> None:
    base = score(segmented, template, classifier.review_threshold, classifier)
    print(f"\n{name}: {base['fields']} fields on {len(segmented)} pages")
    print(
        f"  at the model's threshold {classifier.review_threshold}: field accuracy {base['accuracy']:.2%}, "
        f"{base['flagged']:.1%} flagged for review, {base['wrong_unflagged']} wrong fields NOT flagged "
        f"(of {base['wrong']} wrong)"
    )
    print(f"  {'threshold':>9} {'flagged':>8} {'wrong, not flagged':>19} {'accuracy of accepted':>21}")
    for t in THRESHOLDS:
        s = score(segmented, template, t, classifier)
        print(f"  {t:9.2f} {s['flagged']:8.1%} {s['wrong_unflagged']:19d} {s['accuracy_accepted']:21.2%}")
    print("  field confidence calibration:")
    print_calibration(base["confidence"], base["right"], [(0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.01)])


def print_calibration(conf: np.ndarray, right: np.ndarray, bins: list[tuple[float, float]]) -> None:
    """How often fields are right at each confidence: conf (N,) field confidences, right (N,) bool."""
    for lo, hi in bins:
        sel = (conf >= lo) & (conf < hi)
        if sel.any():
            print(
                f"    confidence {lo:.2f}-{min(hi, 1):.2f}: {sel.sum():4d} fields, "
                f"mean confidence {conf[sel].mean():.3f}, right {right[sel].mean():.3f}"
            )


def pooled(scores: list[dict]) -> tuple[int, float, float, int]:
    """Several `score`s as one: (fields, share right, share flagged, wrong but ok)."""
    total = sum(r["fields"] for r in scores)
    right = sum(r["accuracy"] * r["fields"] for r in scores) / total
    flagged = sum(r["flagged"] * r["fields"] for r in scores) / total
    return total, right, flagged, sum(r["wrong_unflagged"] for r in scores)


def print_table(title: str, rows: list) -> None:
    """rows: (source, form style, score)."""
    print(f"\n{title}:")
    # "Cells right": of the fields read with as many digits as were written, the digits read as
    # written; "miscounted": the fields read with a digit lost, split or added.
    print(f"  {'digits of':30} {'form':38} {'fields':>6} {'right':>7} {'flagged':>8} {'wrong but ok':>13}"
          f"  {'cells right':>11} {'miscounted':>10}")
    for source, form, r in rows:
        print(f"  {source:30} {form:38} {r['fields']:6d} {r['accuracy']:7.2%} {r['flagged']:8.1%} "
              f"{r['wrong_unflagged'] / r['fields']:8.2%} ({r['wrong_unflagged']})"
              f"  {r['cells_right'] / max(r['cells'], 1):11.2%} {r['miscounted'] / r['fields']:10.1%}")
    total, right, flagged, slipped = pooled([r for *_, r in rows])
    low, high = rate_interval(slipped, total)
    print(f"  {'all':69} {total:6d} {right:7.2%} {flagged:8.1%} {slipped / total:8.2%} ({slipped}; "
          f"95% interval {low:.2%}-{high:.2%})")
    alone = sum(r["strike_alone"] for *_, r in rows)
    print(f"  flagged for a stroke across a digit alone (the struck-digit detector): {alone} ({alone / total:.2%})")
    for source in dict.fromkeys(source for source, *_ in rows):
        misread = sum((r["misread"] for s, _, r in rows if s == source), Counter())
        common = ", ".join(f"{a}->{b} {n}" for (a, b), n in misread.most_common(5))
        print(f"  {source}: digits read as another, commonest: {common or 'none'} (of {sum(misread.values())})")


def print_struck(title: str, rows: list) -> None:
    """rows: (source, form style, score) of forms with a digit a page struck through: the table of
    their other fields, then how many of the fields with the struck digit went out `ok`."""
    print_table(title, rows)
    struck, out = sum(r["struck"] for *_, r in rows), sum(r["struck_ok"] for *_, r in rows)
    each = ", ".join(f"{source} on {form} {r['struck_ok']} of {r['struck']}" for source, form, r in rows)
    print(f"  the fields with the struck digit (not in the rows above) out `ok`, which they must not go: {each}; "
          f"all {out} of {struck} ({out / max(struck, 1):.1%})")


def print_risks(read: list, classifier: DigitClassifier) -> None:
    """What the threshold for each risk a template may accept (its `review_risk`: the model card's
    review_thresholds) does to all the fields of `read`, [(segmented pages, template)]."""
    print("  at the threshold for each review_risk a template may accept: flagged, wrong but ok")
    for risk in REVIEW_RISKS:
        threshold = classifier.review_threshold_at(risk)
        total, _, flagged, slipped = pooled([score(segmented, t, threshold, classifier) for segmented, t in read])
        print(f"    {risk:6.1%} ({threshold:.3f}): {flagged:6.1%} {slipped / total:7.2%} ({slipped})")


def one_writer_rows(classifier: DigitClassifier, pages: int, seed: int) -> list:
    """CVL's held-out writers on each form style, each page filled by one writer (those who wrote
    every digit, in turn). Rows (source, form style, score)."""
    from formreader.training.datasets import load_cvl

    glyphs, labels, writers = writer_glyphs(*load_cvl("valid"))
    return [
        ("CVL validation writers", form, read_at_threshold(items, t, classifier))
        for form in FORM_STYLES
        for t, items in [scanned_forms(form, glyphs, labels, pages, seed, writers=writers)]
    ]


def faxed_rows(classifier: DigitClassifier, pages: int, seed: int) -> list:
    """MNIST's and CVL's held-out writers on the samples' form, as scanned and as a fax machine
    sends the same pages in each mode (synth.as_fax), each fax saved as a Group 3 TIFF and read
    back through ingest as a user's file is. Rows (source, how, score)."""
    rows = []
    form = list(FORM_STYLES)[0]
    with tempfile.TemporaryDirectory() as folder:
        for source, (images, labels) in list(held_out_writers().items())[:2]:
            t, items = scanned_forms(form, images, labels, pages, seed)
            rows.append((source, form, read_at_threshold(items, t, classifier)))
            for mode in FAX_MODES:
                faxed = []
                for k, (page, truth) in enumerate(items):
                    fax, resolution = as_fax(page.image, page.dpi, mode)
                    path = Path(folder) / f"{mode}_{k}.tif"
                    Image.fromarray(fax).convert("1").save(path, dpi=resolution, compression="group3")
                    faxed += [(p, truth) for p in read_pages(path)]
                read = read_at_threshold(faxed, t, classifier)
                rows.append((source, f"faxed, {mode} ({FAX_MODES[mode][0]}x{FAX_MODES[mode][1]} DPI)", read))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=40, help="generated pages per source and form")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--details", action="store_true", help="threshold and calibration tables for each set")
    parser.add_argument("--model", type=Path, help="the digit model (.keras); default: the shipped one")
    parser.add_argument("--validation", action="store_true", help="also the forms of the model's validation writers")
    parser.add_argument("--dithered", action="store_true", help="only the samples, and their grey pages dithered")
    parser.add_argument("--fax", action="store_true", help="only the held-out writers' forms as scanned and as faxed")
    parser.add_argument("--no-struck-detector", action="store_true", help="read without the detector of digits struck through")
    args = parser.parse_args()
    template = load_template(ROOT / "templates" / "demo_form.yaml")
    classifier = DigitClassifier.load(args.model)
    if args.no_struck_detector:
        classifier.struck = None
    print(f"the detector of digits struck through: {Path(classifier.struck.path).name if classifier.struck else 'none'}")

    if args.fax:
        print_table(f"Held-out writers' forms as scanned and sent as faxes ({args.pages} pages each, seed {args.seed})",
                    faxed_rows(classifier, args.pages, args.seed))
        return
    truth = pd.read_csv(ROOT / "samples" / "truth.csv", dtype={"value": str}, keep_default_na=False)
    by_page = {(f, int(p)): dict(zip(g.field, g.value)) for (f, p), g in truth.groupby(["file", "page"])}
    items = []
    for path in find_inputs([ROOT / "samples" / "scans"]):
        for page in read_pages(path, pdf_dpi=150, reduce_jpeg=True):
            items.append((page, by_page[(path.name, page.page)]))
    report("Samples (samples/scans)", segment_all(items, template, classifier), template, classifier)
    if args.dithered:
        # Their grey pages as a bitonal scanner's halftone mode gives them (Pillow's Floyd-Steinberg):
        # read as the grey pages are, or with every dot taken for ink (ingest.is_dithered off).
        grey = [(page, truth) for page, truth in items if not is_bitonal(page.image)]
        halftone = [(replace(page, image=np.asarray(Image.fromarray(page.image).convert("1"), np.uint8) * 255), truth)
                    for page, truth in grey]
        report("The samples' grey pages", segment_all(grey, template, classifier), template, classifier)
        report("The same pages dithered", segment_all(halftone, template, classifier), template, classifier)
        pipeline.is_dithered = lambda image: False
        report("The same pages dithered, the dots left in", segment_all(halftone, template, classifier), template, classifier)
        return

    if args.validation:
        from formreader.training.evaluate import CALIBRATION_PAGES, CALIBRATION_SEED, calibration_forms

        rows = [
            (source, style, read_at_threshold(forms, t, classifier))
            for source, style, t, forms in calibration_forms(classifier.meta, CALIBRATION_PAGES, CALIBRATION_SEED)
        ]
        print_table(f"The model's validation writers ({calibration_forms.__module__}.calibration_forms, "
                    f"{CALIBRATION_PAGES} pages each, seed {CALIBRATION_SEED}, threshold {classifier.review_threshold})", rows)
        # Their MNIST digits and CVL writers writing across the boxes' lines and small, and striking
        # a digit through, as below for the held-out writers: what a model that should read such
        # cells better is chosen on.
        def validation_rows(**written) -> list:
            forms = calibration_forms(
                classifier.meta, CALIBRATION_PAGES, CALIBRATION_SEED, **written,
                keep=lambda source, style: not source.startswith("ORAND") and style in list(FORM_STYLES)[:2],
            )
            return [(source, style, read_at_threshold(items, t, classifier))
                    for source, style, t, items in forms]

        for size, how in WRITING_SIZES:
            print_table(f"The same validation writers, digits {size[0]:g}-{size[1]:g} of their box's height ({how})",
                        validation_rows(size=size))
        print_struck("The same validation writers' pages, a digit of each struck through (synth.strike_out), "
                     "their other fields", validation_rows(struck=True))

    rows, read = [], []
    sources = held_out_writers()
    for source, (images, labels) in sources.items():
        for form in FORM_STYLES:
            t, items = scanned_forms(form, images, labels, args.pages, args.seed)
            segmented = segment_all(items, t, classifier)
            if args.details:
                report(f"{source}, {form} (seed {args.seed})", segmented, t, classifier)
            r = score(segmented, t, classifier.review_threshold, classifier)
            rows.append((source, form, r))
            read.append((segmented, t))
    print_table(f"Held-out writers on generated scanned forms ({args.pages} pages each, seed {args.seed}, threshold "
                f"{classifier.review_threshold})", rows)
    print_risks(read, classifier)
    print("  field confidence calibration, all nine:")
    print_calibration(
        np.concatenate([r["confidence"] for *_, r in rows]), np.concatenate([r["right"] for *_, r in rows]),
        [(0, 0.5), (0.5, 0.7), (0.7, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 1.01)],
    )
    errors = []
    for source in [*sources, None]:
        mine = [r for s, _, r in rows if source in (None, s)]
        conf, right = np.concatenate([r["confidence"] for r in mine]), np.concatenate([r["right"] for r in mine])
        errors.append(f"{source or 'all nine'} {calibration_error(conf, right):.2%}")
    print(f"  field confidence's ECE (15 bins): {', '.join(errors)}")

    # A form is filled by one writer: the nine rows' pages draw each cell from any writer of their
    # source (MNIST's and NSYSU's writers are not known), CVL's writers can fill a page each.
    print_table(f"CVL's held-out writers, one a page ({args.pages} pages each, seed {args.seed})",
                one_writer_rows(classifier, args.pages, args.seed))

    # Writing that crosses the boxes' lines, as many people write in small boxes, writing small in
    # large ones, and a digit struck through to void it (its field must go to review: what was
    # meant is written elsewhere, or not at all): known weaknesses, kept out of the nine rows
    # (which the aims are stated on) and shown beside them, MNIST's and CVL's writers on the
    # first two forms.
    def held_out_rows(**written) -> list:
        return [
            (source, form, read_at_threshold(items, t, classifier))
            for source, (images, labels) in list(sources.items())[:2]
            for form in list(FORM_STYLES)[:2]
            for t, items in [scanned_forms(form, images, labels, args.pages, args.seed, **written)]
        ]

    for size, how in WRITING_SIZES:
        print_table(f"The same writers, digits {size[0]:g}-{size[1]:g} of their box's height ({how}; {args.pages} pages each)",
                    held_out_rows(size=size))
    print_struck(f"The same writers' pages, a digit of each struck through (synth.strike_out; {args.pages} pages each), "
                 "their other fields", held_out_rows(struck=True))


if __name__ == "__main__":
    main()
