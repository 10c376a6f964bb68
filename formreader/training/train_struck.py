"""Training the detector of digits struck through (models/digits.struck.keras, beside the digit model).

People void a digit written in a box by striking it through, and write the meant one elsewhere.
The digit networks read many such cells as the digit under the stroke, and are sure of it (stop
58: 23 of 160 held-out struck fields went out `ok`); taught to refuse them, they parted from the
networks their calibration was fitted for. This small network looks at what the 28x28 input
cannot show, the cell's ink as its box frames it (segment.box_view), where a stroke runs from
side to side of the box. It adds a review reason and changes no reading or confidence.

It trains on forms written by the digit model's own training writers, a third of their cells
struck by `synth.voiding_strokes`; its threshold is chosen on the forms `formreader calibrate`
fits on (the validation writers), and it is measured on the benchmarks' `synth.strike_out`,
another hand's strokes, by writers no network trained on (benchmarks/evaluate_forms.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from formreader.reading.classify import DigitClassifier, StrikeDetector, cached_tflite
from formreader.reading.segment import BOX_VIEW

STRUCK_SHARE = 1 / 3  # of the written cells of training's forms
# At most this share of the validation forms' fields, none of whose digits was struck, are flagged
# for a strike: what the detector may cost in review.
FLAG_SHARE = 0.01


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

    from formreader.reading.classify import CALIBRATION_PAGES
    from formreader.training.evaluate import CALIBRATION_SEED, calibration_forms

    started = time.time()
    keras.utils.set_random_seed(seed)
    classifier = DigitClassifier.load(digit_model)
    meta = classifier.meta
    writers = training_writers(meta, data_dir).values()
    parts = [struck_cells(images, labels, pages, seed + 10 * k) for k, (images, labels) in enumerate(writers)]
    x = np.concatenate([v for v, _ in parts])[..., None]
    y = np.concatenate([s for _, s in parts]).astype(np.float32)
    log(f"{len(x)} written cells of {pages} forms a source and style, {y.mean():.1%} struck through")
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
        "struck by synth.voiding_strokes",
        "cells": len(x),
        "epochs": epochs,
        "seed": seed,
        "digit_model": str(digit_model or "models/digits.keras"),
    }
    detector = StrikeDetector(cached_tflite(out, card), 1.0, card, str(out), threads=2)
    n = validation_pages or CALIBRATION_PAGES
    plain, _, ok = field_scores(detector, classifier, calibration_forms(meta, n, CALIBRATION_SEED, data_dir))
    # The fields it would flag that go out `ok` without it: what it costs a clerk.
    threshold = lowest_threshold(np.where(ok, plain, 0.0), FLAG_SHARE)
    forms = calibration_forms(meta, max(1, n // 2), CALIBRATION_SEED, data_dir, struck=True)
    scores, voided, unaided = field_scores(detector, classifier, forms)
    card["struck_threshold"] = threshold
    card["validation"] = {
        "chosen_for": f"the lowest threshold that flags at most {FLAG_SHARE:.0%} of the validation forms' fields with no digit "
        "struck that go out `ok` without the detector",
        "fields": len(plain),
        "flagged_share": float((ok & (plain >= threshold)).mean()),
        "scored_over_share": float((plain >= threshold).mean()),
        "struck_fields": int(voided.sum()),
        "struck_caught": float((scores[voided] >= threshold).mean()),
        "struck_ok_unaided": int((voided & unaided).sum()),
        "struck_ok": int((voided & unaided & (scores < threshold)).sum()),
    }
    card["seconds"] = round(time.time() - started)
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")  # the fast path's digests among it
    v = card["validation"]
    log(f"threshold {threshold:.4f}: {v['flagged_share']:.2%} of {len(plain)} validation fields flagged that went out `ok`; "
        f"of {v['struck_fields']} with a digit struck {v['struck_ok']} out `ok` ({v['struck_ok_unaided']} without the detector)")
    return card
