"""Free-written numbers: string and digit accuracy on the sample checks and on held-out checks.

    python benchmarks/evaluate_checks.py [--checks 200] [--seed 555] [--model models/digits.keras]

Reads samples/checks (truth in samples/checks_truth.csv) through the whole pipeline,
`--checks` freshly generated scanned checks (MNIST test digits, a seed the samples do not use),
and the real check amounts of ORAND-CAR-A's test split (checks no model was trained, chosen or
calibrated on; formreader.training.datasets.orand_split), each reader alone and both together,
and again with a digit of each struck through (how many go out `ok`, as they must not).
Prints string accuracy (every digit right), digit accuracy (digits of the truth found in order, by
alignment), separator accuracy (the raw reading equal to what was written), the share of fields
flagged for review and the number of wrong strings NOT flagged, what the wrong ones did to the
digits written (misread, lost or added), and how the fields with two 1s side by side read (written
close, the string model reads them as one); for the held-out checks also (and for the free fields of
forms) what other review thresholds would do, and how often fields are right at each confidence.
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

from formreader.pipeline import read_page, review_thresholds  # noqa: E402
from formreader.reading.classify import NOT_A_DIGIT, REVIEW_RISKS, DigitClassifier  # noqa: E402
from formreader.reading.fields import DEFAULT_REVIEW_THRESHOLD  # noqa: E402
from formreader.reading.ingest import Page, find_inputs, read_pages  # noqa: E402
from formreader.reading.register import prepare_reference  # noqa: E402
from formreader.reading.strings import segment_string  # noqa: E402
from formreader.reading.template import load_template  # noqa: E402
from formreader.training.datasets import load_mnist, load_orand  # noqa: E402
from formreader.training.evaluate import calibration_error, rate_interval  # noqa: E402
from formreader.training.synth import DigitSource, make_checks, scan, write_number  # noqa: E402


def score(results: list[tuple], thresholds: dict[str, float] | None = None) -> None:
    """results: (truth value, truth raw, read value, read raw, status, confidence, broke a rule);
    thresholds: what each of these review thresholds would do, by name."""
    truth, _, read, _, status, confidence, rule = (np.array(c) for c in zip(*results))
    right = truth == read
    found = sum(sum(b.size for b in difflib.SequenceMatcher(None, tv, rv).get_matching_blocks()) for tv, rv in zip(truth, read))
    digits = found / sum(len(tv) for tv in truth)
    raw = np.mean([r[1] == r[3] for r in results])
    flagged = status != "ok"
    wrong, unflagged = int((~right).sum()), int((~right & ~flagged).sum())
    print(f"  {len(results)} fields: string accuracy {right.mean():.1%}, digit accuracy {digits:.1%}, with separators {raw:.1%}")
    low, high = rate_interval(unflagged, len(flagged))
    print(f"  {flagged.mean():.1%} flagged for review; {unflagged} wrong strings NOT flagged (of {wrong} wrong; "
          f"{unflagged / max(len(flagged), 1):.2%} of fields, 95% interval {low:.2%}-{high:.2%})")
    print(f"  the wrong fields: {how_wrong(truth[~right], read[~right])}")
    # Two 1s side by side: written close, the string model's 4-px steps read them as one (stop 63).
    ones = np.array(["11" in t for t in truth])
    if ones.any():
        print(f"  fields with two 1s side by side: {right[ones].mean():.1%} of {int(ones.sum())} right, "
              f"{int((ones & ~right & ~flagged).sum())} wrong NOT flagged")
    if not thresholds:
        return
    print("  review threshold: flagged / wrong NOT flagged:")
    for name, t in thresholds.items():
        flag = rule | (confidence < t)
        print(f"    {name}: {flag.mean():.1%} / {int((~right & ~flag).sum())}")
    print("  calibration (fields that break no rule): confidence range -> fields, mean confidence, share right")
    for lo, hi in ((0.0, 0.5), (0.5, 0.7), (0.7, 0.85), (0.85, 0.95), (0.95, 1.01)):
        m = ~rule & (confidence >= lo) & (confidence < hi)
        if m.any():
            print(f"    [{lo:.2f}, {min(hi, 1):.2f}): {int(m.sum())}, {confidence[m].mean():.3f}, {right[m].mean():.1%}")
    print(f"    ECE (15 bins): {calibration_error(confidence[~rule], right[~rule]):.2%}")


def how_wrong(truth, read) -> str:
    """What the wrong readings did to the digits written (truth, read: digit strings): as many
    digits read as written (some misread: the commonest written -> read pairs), fewer (a digit
    lost), none (the field read empty) or more (a digit added)."""
    misread = [(a, b) for t, r in zip(truth, read) if len(t) == len(r) for a, b in zip(t, r) if a != b]
    common = ", ".join(f"{a}->{b} {n}" for (a, b), n in pd.Series(misread).value_counts().head(5).items())
    same = sum(len(t) == len(r) for t, r in zip(truth, read))
    empty = sum(not r for r in read)
    fewer = sum(0 < len(r) < len(t) for t, r in zip(truth, read))
    more = sum(len(r) > len(t) for t, r in zip(truth, read))
    return (f"{same} with as many digits as written (commonest misread: {common or 'none'}), {fewer} with fewer, "
            f"{empty} read empty, {more} with more")


def free_thresholds(classifier: DigitClassifier, document: str = "form") -> dict[str, float]:
    """Free fields' review thresholds to show: the string model's for each risk a template of that
    `document` may accept (its card's review_thresholds for that kind of paper), and a few fixed ones."""
    shown = {f"{t:.2f}": t for t in (0.7, 0.8, DEFAULT_REVIEW_THRESHOLD, 0.9, 0.95)}
    if classifier.string_model is not None:
        for r in REVIEW_RISKS:
            t = classifier.string_model.review_threshold_at(r, document)
            shown[f"{t:.3f} (for a risk of {r:.1%})"] = t
    return dict(sorted(shown.items(), key=lambda item: item[1]))


def broke_rule(field) -> bool:
    """Flagged for something other than its confidence (length, pattern, a mark that is no digit)."""
    return any(not r.startswith("low confidence") for r in field.reasons)


def uncut_pairs(classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray, n: int = 300) -> None:
    """How each model reads two touching digits left uncut: the box model never saw one."""
    rng = np.random.default_rng(4)
    source = DigitSource(images, labels, rng, reuse=True)
    wholes = []
    for _ in range(n):
        canvas = np.full((90, 200), 245, np.uint8)
        pair = "".join(str(d) for d in rng.integers(0, 10, 2))
        write_number(canvas, (5, 5, 190, 80), pair, source, rng, ink=30, touching=1.0, broken=0.0)
        layout = segment_string(canvas)
        blobs = [b for b in layout.blobs if b.kind == "digit"]
        if len(blobs) == 1:  # the two digits touch: one blob, whose first reading is itself whole
            wholes.append(layout.images[blobs[0].alternatives[0][1][0]])
    print(f"Touching pairs of MNIST test digits, left uncut ({len(wholes)}):")
    for name, model in (("box model", classifier), ("piece model", classifier.for_strings)):
        read = model.probabilities(np.stack(wholes))
        refused = read.argmax(1) == NOT_A_DIGIT
        confident = ~refused & (read.max(1) > 0.9)
        print(f"  {name}: read as one digit with confidence > 0.9: {confident.mean():.1%}; refused: {refused.mean():.1%}")


def orand_test(classifier: DigitClassifier, review_risk: float | None, document: str, seed: int) -> None:
    """Real check amounts never trained on: the readers alone and the decision of both, at the
    risk the check template accepts (its `review_risk`) on its kind of paper (`document`); and the
    same amounts with a digit struck through (`seed`)."""
    from formreader.api import read_number
    from formreader.reading.fields import reading_pattern
    from formreader.reading.string_model import decode, digits_of
    from formreader.reading.template import Field
    from formreader.training.evaluate import read_free_fields
    from formreader.training.synth import strike_out, struck_amounts

    try:
        amounts = load_orand("test")
    except FileNotFoundError as e:
        print(f"ORAND-CAR-A left out: {e}")
        return
    spec = Field("amount", kind="free", box=(0, 0, 1, 1), separators=".,")
    threshold = review_thresholds(classifier, None, review_risk, document)[1]  # free fields', as read_number decides
    print(
        f"ORAND-CAR-A test checks ({len(amounts)} real amounts, held out; review risk {review_risk} on a {document}, "
        f"threshold {threshold}):"
    )
    if classifier.string_model is not None:
        readings = read_free_fields(classifier, [a.image for a in amounts], [spec] * len(amounts))
        both = np.mean([r.value == a.value for r, a in zip(readings, amounts)])
        whole = np.mean([r.chosen(0.0).value == a.value for r, a in zip(readings, amounts)])
        # The first view is the crop itself: decoded alone, the reading without the other views.
        pattern = reading_pattern(spec)
        one_view = np.mean([digits_of(decode(r.whole.steps, pattern).text) == a.value for r, a in zip(readings, amounts)])
        cut = np.mean([r.cut.value == a.value for r, a in zip(readings, amounts)])
        print(f"  the readers' choice {both:.1%} of amounts right; string model alone {whole:.1%} (from the crop's view "
              f"alone {one_view:.1%}); cut-and-classify alone {cut:.1%}")
    results = []
    for a in amounts:
        r = read_number(a.image, separators=".,", model=classifier.path, review_risk=review_risk, document=document)
        rule = any(not x.startswith("low") for x in r.reasons)
        results.append((a.value, a.value, r.value, r.value, r.status, r.confidence, rule))
    score(results, free_thresholds(classifier, document))
    # The labels as distributed, some of which their images contradict (datasets.ORAND_RELABELLED).
    given = [a.value for a in load_orand("test", relabelled=False)]
    right = np.array([v == r[2] for v, r in zip(given, results)])
    passed = np.array([r[4] == "ok" for r in results])
    print(f"  by the labels as distributed ({sum(g != a.value for g, a in zip(given, amounts))} differ): "
          f"{right.mean():.1%} right, {int((~right & passed).sum())} wrong NOT flagged")
    # A digit struck through across its box, as a writer voids one (synth.strike_out, the
    # benchmarks' hand, not the detector's training's): such an amount must go to review.
    voided, _ = struck_amounts(amounts, seed, strike_out)
    out = [read_number(v, separators=".,", model=classifier.path, review_risk=review_risk, document=document) for v in voided]
    print(f"  a digit struck through (each amount once): {sum(r.status == 'ok' for r in out)} of {len(out)} out `ok`")


def fields_read(items: list, template, features, classifier: DigitClassifier):
    """(truth, reading) of each field of the pages of `items` [(page, {field: truth})] that register."""
    from formreader.pipeline import read_segmented, segment_page
    from formreader.reading.register import RegistrationError

    for page, truth in items:
        try:
            read = read_segmented(segment_page(page, template, features), template, classifier)
        except RegistrationError:
            continue
        yield from ((truth[f.name], f) for f in read.fields)


def free_forms(classifier: DigitClassifier, pages: int, seed: int) -> None:
    """Free fields on forms: a number written in a thick-bordered box, worn print, bitonal 300-DPI
    scans, digits of writers no model was trained on."""
    from formreader.training.evaluate import held_out_writers
    from formreader.training.synth import scanned_free_forms

    sources = held_out_writers()
    print(f"Free fields on forms ({pages} pages of 6 fields each, thick worn borders, bitonal 300 dpi, seed {seed}):")
    for name, (images, labels) in sources.items():
        template, items = scanned_free_forms(images, labels, pages, seed)
        features = prepare_reference(template.reference)
        results = [
            (t, t, f.value, f.value, f.status, f.confidence, broke_rule(f))
            for t, f in fields_read(items, template, features, classifier)
        ]
        print(f" {name}:")
        score(results, free_thresholds(classifier))
        # The same pages with a digit of one field struck through, as a writer voids it: that
        # field must go to review (what was meant is written elsewhere, or not at all).
        _, items = scanned_free_forms(images, labels, pages, seed, struck=True)
        out = [f.status == "ok" for t, f in fields_read(items, template, features, classifier) if t is None]
        print(f"  a digit struck through (one field a page): {sum(out)} of {len(out)} such fields out `ok`")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--seed", type=int, default=555)
    parser.add_argument("--free-pages", type=int, default=30, help="free-field forms per source of writers")
    parser.add_argument("--model", type=Path, help="the digit model (.keras), the others beside it; default: the shipped ones")
    args = parser.parse_args()
    template = load_template(ROOT / "templates" / "bank_check.yaml")
    classifier = DigitClassifier.load(args.model)
    features = prepare_reference(template.reference)

    truth = pd.read_csv(ROOT / "samples" / "checks_truth.csv", dtype=str, keep_default_na=False)
    expected = {(r.file, int(r.page), r.field): (r.value, r.raw) for r in truth.itertuples()}
    results = []
    for path in find_inputs([ROOT / "samples" / "checks"]):
        for page in read_pages(path, pdf_dpi=150, reduce_jpeg=True):
            read = read_page(page, template, classifier, features)
            for f in read.fields:
                results.append((*expected[(path.name, page.page, f.name)], f.value, f.raw, f.status, f.confidence, broke_rule(f)))
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
            results.append(("".join(c for c in raw if c.isdigit()), raw, f.value, f.raw, f.status, f.confidence, broke_rule(f)))
    print(
        f"Held-out generated checks (seed {args.seed}; the check template's review risk {template.review_risk} "
        f"on a {template.document}):"
    )
    score(results, free_thresholds(classifier, template.document))
    uncut_pairs(classifier, images, labels)
    orand_test(classifier, template.review_risk, template.document, args.seed)
    free_forms(classifier, args.free_pages, args.seed)


if __name__ == "__main__":
    main()
