"""Training the detector of digits struck through (models/digits.struck.keras, beside the digit model).

People void a digit written in a box by striking it through, and write the meant one elsewhere.
The digit networks read many such cells as the digit under the stroke, and are sure of it (stop
58: 23 of 160 held-out struck fields went out `ok`); taught to refuse them, they parted from the
networks their calibration was fitted for. This small network looks at what the 28x28 input
cannot show, the cell's ink as its box frames it (segment.box_view), where a stroke runs from
side to side of the box; and each digit of a free field on a form framed as a box would frame it
(strings.digit_views). It adds a review reason and changes no reading or confidence.

It trains on forms written by the digit model's own training writers, a third of their boxed
cells struck by `synth.voiding_strokes`, on free-field forms and ORAND's training amounts with a
digit struck alike; its thresholds are chosen on the forms `formreader calibrate` and
`calibrate-strings` fit on (the validation writers), and it is measured on the benchmarks'
`synth.strike_out`, another hand's strokes, by writers no network trained on
(benchmarks/evaluate_forms.py, benchmarks/evaluate_checks.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from formreader.reading.classify import DigitClassifier, StrikeDetector, cached_tflite
from formreader.reading.segment import BOX_VIEW
from formreader.reading.strings import StringReading

STRUCK_SHARE = 1 / 3  # of the written cells of training's forms
# At most this share of the validation forms' fields, none of whose digits was struck, are flagged
# for a strike: what the detector may cost in review.
FLAG_SHARE = 0.01
# A free field's digit read within this share of the stroke's span of its centre is the struck one.
STROKE_REACH = 0.35


def struck_model():
    """The detector: (BOX_VIEW, BOX_VIEW, 1) ink at the box's scale -> the chance it is struck through."""
    import keras
    from keras import layers

    inputs = keras.Input((BOX_VIEW, BOX_VIEW, 1))
    x = inputs
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.3)(layers.Flatten()(x))
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x), name="struck")


def training_writers(meta: dict, data_dir: Path | None = None) -> dict[str, tuple]:
    """The digit model's training writers, as its card leaves them: MNIST train less the model's
    validation split, CVL's train writers less its validation writers, the ORAND training checks'
    digits. {source: (images, labels)}, each ready for synth.make_pages."""
    from formreader.training.datasets import load_cvl, load_mnist, load_orand, orand_digit_crops
    from formreader.training.synth import ink_on_black
    from formreader.training.train import TrainConfig, mnist_split

    root = Path(data_dir) if data_dir else None
    config = TrainConfig.from_card(meta.get("config", {}))
    images, labels = load_mnist("train", root / "mnist" if root else None, False)
    _, train = mnist_split(len(images), config, np.random.default_rng(config.seed))
    x, y, writers = load_cvl("train", root / "cvl_digits" / "cvl_train.npz" if root else None)
    theirs = ~np.isin(writers, meta.get("held_out", {}).get("cvl_validation_writers", []))
    crops, digits, _ = orand_digit_crops(load_orand("train", root / "orand_car_a" if root else None))
    return {
        "MNIST": (images[train], labels[train]),
        "CVL": ink_on_black(x[theirs], y[theirs]),
        "ORAND": ink_on_black(crops, digits),
    }


def struck_cells(images, labels: np.ndarray, pages: int, seed: int, share: float = STRUCK_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """`pages` forms of each of synth.FORM_STYLES filled with the digits, from inside their boxes
    to across their lines (train.FORM_WRITING: a digit crossing its box's line is no strike),
    `share` of the written cells struck through (synth.voiding_strokes), scanned, registered and
    segmented as the pipeline reads a page. Returns (views (N, BOX_VIEW, BOX_VIEW) float32, struck (N,) bool): every
    cell where a digit was found."""
    from formreader.training.synth import FORM_STYLES, pen_or_pencil, scanned_as, voiding_strokes, written_forms
    from formreader.training.train import FORM_WRITING, registered_pages

    views, struck = [], []
    for k, style in enumerate(FORM_STYLES):
        template, filled = written_forms(style, images, labels, pages, seed + k, size=FORM_WRITING)
        rng = np.random.default_rng([seed, k, 60])
        voided = []
        for page in filled:
            marked = set()
            for f, spec in enumerate(template.fields):
                digits = iter(page.values.get(spec.name, ""))
                for c, (x, y, w, h) in enumerate(spec.cells):
                    if page.image[y + 2 : y + h - 2, x + 2 : x + w - 2].min() > 200:
                        continue  # a box left blank (its written digits are the others, in order)
                    digit = int(next(digits, -1))
                    if rng.random() < share:
                        voiding_strokes(page.image, spec.cells[c], digit, rng, pen_or_pencil(rng))
                        marked.add((f, c))
            voided.append(marked)
        for seg, marked in registered_pages(template, zip(scanned_as(style, filled, seed + k), voided)):
            for f, cells in enumerate(seg.segments):
                for c, cell in enumerate(cells if isinstance(cells, list) else []):
                    if cell.view is not None:
                        views.append(cell.view)
                        struck.append((f, c) in marked)
    return np.array(views, np.float32).reshape(-1, BOX_VIEW, BOX_VIEW), np.array(struck, bool)


def crop_views(
    crop: np.ndarray, classifier: DigitClassifier, spec, document: str = "form"
) -> tuple[np.ndarray, StringReading, np.ndarray]:
    """A free field's grey crop read as read_number reads it on that `document`
    (pipeline.read_free_image; with no detector, whatever the classifier holds): its digits' views
    (strings.digit_views), the reading, and each digit's centre across the crop (x, crop px)."""
    from formreader.pipeline import read_free_image, review_thresholds
    from formreader.reading.strings import digit_views, field_image

    image, (x, _) = field_image(crop)
    threshold = review_thresholds(classifier, document=document)[1]
    layout, reading = read_free_image(image, dataclasses.replace(classifier, struck=None), spec, threshold, document)
    columns = [(bx, bx + w) for bx, _, w, _ in reading.boxes]
    return digit_views(layout, columns), reading, np.array([x + (a + b) / 2 for a, b in columns])


def struck_free_views(
    images, labels: np.ndarray, pages: int, seed: int, classifier: DigitClassifier
) -> tuple[np.ndarray, np.ndarray]:
    """`pages` free-field forms (synth.scanned_free_forms) written with the digits, a digit of one
    field a page struck through by `synth.voiding_strokes`, each field read as the pipeline reads
    it. Returns (views (N, BOX_VIEW, BOX_VIEW) float32, struck (N,) bool): every digit read, and
    whether it is where the stroke was drawn."""
    from formreader.pipeline import free_field_window
    from formreader.training.synth import scanned_free_forms, voiding_strokes
    from formreader.training.train import registered_pages

    strokes = []  # the square each stroke was drawn across, a page's in turn

    def voiding(canvas, box, digit, rng, ink) -> None:
        strokes.append(box)
        voiding_strokes(canvas, box, digit, rng, ink)

    template, items = scanned_free_forms(images, labels, pages, seed, struck=True, strike=voiding)
    views, struck = [], []
    for seg, (truth, (sx, _, side, _)) in registered_pages(template, [(p, (t, b)) for (p, t), b in zip(items, strokes)]):
        for spec in template.fields:
            crop, (x0, _) = free_field_window(seg.registration.aligned, spec.box)
            found, _, centres = crop_views(crop, classifier, spec)
            views += list(found)
            struck += list((truth[spec.name] is None) & (np.abs(x0 + centres - (sx + side / 2)) < STROKE_REACH * side))
    return np.array(views, np.float32).reshape(-1, BOX_VIEW, BOX_VIEW), np.array(struck, bool)


def struck_amount_views(amounts: list, seed: int, classifier: DigitClassifier) -> tuple[np.ndarray, np.ndarray]:
    """Real check amounts (datasets.CheckAmount) read as they are and again with one digit struck
    through by `synth.voiding_strokes` across its box (synth.struck_amounts): (views, struck) as
    struck_free_views'."""
    from formreader.reading.template import Field
    from formreader.training.synth import struck_amounts

    spec = Field("amount", kind="free", box=(0, 0, 1, 1), separators=".,")
    views, struck = [], []
    for a, voided, (sx, _, side, _) in zip(amounts, *struck_amounts(amounts, seed)):
        found, _, _ = crop_views(a.image, classifier, spec, "check")
        views += list(found)
        struck += [False] * len(found)
        found, _, centres = crop_views(voided, classifier, spec, "check")
        views += list(found)
        struck += list(np.abs(centres - (sx + side / 2)) < STROKE_REACH * side)
    return np.array(views, np.float32).reshape(-1, BOX_VIEW, BOX_VIEW), np.array(struck, bool)


def free_field_scores(detector: StrikeDetector, classifier: DigitClassifier, crops: list, specs: list) -> tuple:
    """For free fields' grey crops on forms, each field's highest score of a digit struck through,
    and whether it goes out `ok` read by `classifier` with no detector."""
    scores, ok = [], []
    for crop, spec in zip(crops, specs):
        views, reading, _ = crop_views(crop, classifier, spec)
        scores.append(float(detector.probabilities(views).max()) if len(views) else 0.0)
        ok.append(reading.status == "ok")
    return np.array(scores), np.array(ok, bool)


def field_scores(detector: StrikeDetector, classifier: DigitClassifier, forms: list) -> tuple[np.ndarray, ...]:
    """For forms [(source, style, template, [(page, truth)])] (evaluate.calibration_forms), each
    boxed field's highest score of a digit struck through; whether one was (its truth None); and
    whether the field goes out `ok` read by `classifier` with no detector."""
    from formreader.pipeline import mark_struck, read_segmented
    from formreader.training.train import registered_pages

    unaided = dataclasses.replace(classifier, struck=None)
    scores, voided, ok = [], [], []
    for _, _, template, items in forms:
        for seg, truth in registered_pages(template, items):
            read = read_segmented(seg, template, unaided)
            mark_struck(seg, detector)
            for spec, cells, field in zip(template.fields, seg.segments, read.fields):
                if spec.kind != "free":
                    scores.append(max((c.struck for c in cells), default=0.0))
                    voided.append(truth[spec.name] is None)
                    ok.append(field.status == "ok")
    return np.array(scores), np.array(voided, bool), np.array(ok, bool)


def lowest_threshold(scores: np.ndarray, share: float) -> float:
    """The lowest threshold that at most `share` of `scores` (N,) reach."""
    top = np.sort(scores)[::-1]
    allowed = int(share * len(top))
    return float(top[-1]) if allowed >= len(top) else float(np.nextafter(top[allowed], np.inf))


def free_validation(detector: StrikeDetector, classifier: DigitClassifier, forms: int, data_dir: Path | None = None) -> dict:
    """The free fields' threshold and what it does (validation_figures), chosen on the free-field
    forms `formreader calibrate-strings` fits on (`forms` a population of validation writers) and
    measured on the same forms with a digit of one field a page struck. Forms' fields only: a
    check's are not looked at (pipeline.struck_digits)."""
    from formreader.training.evaluate import CALIBRATION_FIELD_DOCUMENTS, STRINGS_CALIBRATION_SEED, two_reader_calibration_fields

    def on_forms(struck: bool) -> tuple[list, list, list]:
        fields = two_reader_calibration_fields(classifier, 0, STRINGS_CALIBRATION_SEED, data_dir, forms, struck)
        crops, specs, truths, sources = fields
        kept = [k for k, source in enumerate(sources) if CALIBRATION_FIELD_DOCUMENTS[source] == "form"]
        return [crops[k] for k in kept], [specs[k] for k in kept], [truths[k] for k in kept]

    crops, specs, _ = on_forms(False)
    plain, ok = free_field_scores(detector, classifier, crops, specs)
    threshold = lowest_threshold(np.where(ok, plain, 0.0), FLAG_SHARE)
    crops, specs, truths = on_forms(True)
    voided = [k for k, t in enumerate(truths) if t is None]
    scores, unaided = free_field_scores(detector, classifier, [crops[k] for k in voided], [specs[k] for k in voided])
    return validation_figures(threshold, plain, ok, scores, np.ones(len(scores), bool), unaided)


def validation_figures(
    threshold: float, plain: np.ndarray, ok: np.ndarray, scores: np.ndarray, voided: np.ndarray, unaided: np.ndarray
) -> dict:
    """What a threshold does on validation fields: `plain` (N,) the highest score of each field with
    no digit struck and `ok` whether it goes out `ok` without the detector; `scores`, `voided`,
    `unaided` (M,) the same of fields some of which (`voided`) have a digit struck."""
    return {
        "threshold": threshold,
        "chosen_for": f"the lowest threshold that flags at most {FLAG_SHARE:.0%} of the validation fields with no digit "
        "struck that go out `ok` without the detector",
        "fields": len(plain),
        "flagged_share": float((ok & (plain >= threshold)).mean()),
        "scored_over_share": float((plain >= threshold).mean()),
        "struck_fields": int(voided.sum()),
        "struck_caught": float((scores[voided] >= threshold).mean()) if voided.any() else 0.0,
        "struck_ok_unaided": int((voided & unaided).sum()),
        "struck_ok": int((voided & unaided & (scores < threshold)).sum()),
    }


def train_struck(
    out: Path,
    digit_model: Path | None = None,
    pages: int = 120,
    epochs: int = 12,
    seed: int = 60,
    validation_pages: int | None = None,
    data_dir: Path | None = None,
    log=print,
) -> dict:
    """Train the detector beside `digit_model` (its writers: training_writers), choose its
    threshold on the validation writers' forms, and write `out` (.keras), its card and fast path."""
    import keras

    from formreader.reading.classify import CALIBRATION_FREE_FORMS, CALIBRATION_PAGES
    from formreader.training.datasets import load_orand
    from formreader.training.evaluate import CALIBRATION_SEED, calibration_forms
    from formreader.training.synth import FORM_STYLES

    started = time.time()
    keras.utils.set_random_seed(seed)
    classifier = DigitClassifier.load(digit_model)
    meta = classifier.meta
    writers = training_writers(meta, data_dir).values()
    parts = [struck_cells(images, labels, pages, seed + 10 * k) for k, (images, labels) in enumerate(writers)]
    cells = sum(len(v) for v, _ in parts)
    share = np.concatenate([s for _, s in parts]).mean()
    log(f"{cells} written cells of {pages} forms a source and style, {share:.1%} struck through")
    # Free fields' digits, framed as a box would frame them: as many free-field forms a source as
    # boxed ones, and ORAND's training amounts, as written and with a digit struck.
    free_forms = pages * len(FORM_STYLES)
    free = [struck_free_views(x, y, free_forms, seed + 10 * k + 5, classifier) for k, (x, y) in enumerate(writers)]
    free.append(struck_amount_views(load_orand("train", Path(data_dir) / "orand_car_a" if data_dir else None), seed, classifier))
    log(f"{sum(len(v) for v, _ in free)} digits of free fields ({free_forms} forms a source, ORAND's training amounts), "
        f"{np.concatenate([s for _, s in free]).mean():.1%} struck through")
    x = np.concatenate([v for v, _ in parts + free])[..., None]
    y = np.concatenate([s for _, s in parts + free]).astype(np.float32)
    model = struck_model()
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=128, shuffle=True, verbose=2 if log is print else 0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    card = {
        "temperature": 1.0,  # read as a score against its threshold, not as a calibrated probability
        "trained_on": "the digit model's training writers (train_struck.training_writers): forms of every synth.FORM_STYLES, "
        f"{pages} a source and style, written train.FORM_WRITING of their boxes tall, {STRUCK_SHARE:.0%} of written cells "
        f"struck by synth.voiding_strokes; free-field forms, {free_forms} a source, and ORAND's training amounts, as written "
        "and with a digit struck by synth.voiding_strokes, each digit read seen as strings.digit_views frames it",
        "cells": cells,
        "free_digits": len(x) - cells,
        "epochs": epochs,
        "seed": seed,
        "digit_model": str(digit_model or "models/digits.keras"),
    }
    detector = StrikeDetector(cached_tflite(out, card), 1.0, card, str(out), threads=2)
    n = validation_pages or CALIBRATION_PAGES
    plain, _, ok = field_scores(detector, classifier, calibration_forms(meta, n, CALIBRATION_SEED, data_dir))
    # The fields it would flag that go out `ok` without it: what it costs a clerk.
    card["struck_threshold"] = lowest_threshold(np.where(ok, plain, 0.0), FLAG_SHARE)
    forms = calibration_forms(meta, max(1, n // 2), CALIBRATION_SEED, data_dir, struck=True)
    card["validation"] = validation_figures(card["struck_threshold"], plain, ok, *field_scores(detector, classifier, forms))
    # Free fields alike, on the forms' fields `formreader calibrate-strings` fits on.
    card["validation_free"] = free_validation(detector, classifier, validation_pages or CALIBRATION_FREE_FORMS, data_dir)
    card["struck_free_threshold"] = card["validation_free"]["threshold"]
    card["seconds"] = round(time.time() - started)
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")  # the fast path's digests among it
    return card  # its validation figures are printed by `formreader train-struck`
