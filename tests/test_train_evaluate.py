"""Training end to end on a small subset, calibration, and the evaluation figures."""

from __future__ import annotations

import numpy as np
import pytest

from formreader.reading.classify import NOT_A_DIGIT, REVIEW_RISK, REVIEW_RISKS, DigitClassifier
from formreader.training.evaluate import (
    confusion_matrix,
    evaluate_probabilities,
    expected_calibration_error,
    rate_interval,
    risk_at_coverage,
    risk_coverage,
)
from formreader.training.train import (
    SOURCES,
    TrainConfig,
    TrainingData,
    augment_batch,
    fit_temperature,
    make_string_pieces,
    nll,
    scanned_copies,
    train_model,
)

from .conftest import run_cli


def test_training_runs_end_to_end_on_a_subset(tmp_path):
    """A tiny training, asked for 5 epochs in a time limit that one epoch overruns (as a lent
    accelerator's call would be): it stops after that epoch and still writes a whole model."""
    out = tmp_path / "tiny.keras"
    meta = train_model(out, TrainConfig(epochs=5, limit=400, batch_size=64, time_limit=0.01), log=lambda *_: None)
    assert out.exists() and out.with_suffix(".json").exists()
    assert meta["epochs_run"] == 1 and meta["stopped_for_time"] and meta["temperature"] > 0
    clf = DigitClassifier.load(out)
    p = clf.probabilities(np.zeros((3, 28, 28), np.float32))
    assert p.shape == (3, 11)


def test_the_splits_are_prepared_for_an_accelerator_without_training(tmp_path):
    """`train --prepare-only` writes what a lent accelerator trains on (models/MODEL_CARD.md) and
    trains nothing: both splits, with labels and every real source; a second run asks for --force
    rather than build over the file, and a run with no file to write says so."""
    prepared, out = tmp_path / "splits.npz", tmp_path / "never.keras"
    args = ("train", "--prepare-only", "--prepared", prepared, "--limit", 300, "--out", out)
    run = run_cli(*args)
    assert run.returncode == 0, run.stderr
    assert prepared.exists() and not out.exists() and "nothing trained" in run.stdout
    splits = TrainingData.load(prepared)
    assert len(splits.x_train) > len(splits.x_val) > 0 and splits.x_train.shape[1:] == (28, 28)
    assert splits.x_train.max() > 0.9 and set(np.unique(splits.y_train)) == set(range(NOT_A_DIGIT + 1))
    used = {SOURCES[k] for k in np.unique(splits.source_train)}
    assert {"mnist", "cvl", "orand", "not_a_digit"} <= used
    again = run_cli(*args)
    assert again.returncode == 2 and "--force" in again.stderr
    nameless = run_cli("train", "--prepare-only", "--limit", 300)
    assert nameless.returncode == 2 and "--prepared" in nameless.stderr


def test_a_model_trained_on_another_backend_gets_its_fast_path_at_first_load(tmp_path, classifier, monkeypatch):
    """TensorFlow's converter fails on a model built on Keras' JAX backend (as trained on a lent
    accelerator): training then leaves the .tflite to the model's first load, which makes it on
    TensorFlow's backend and reads as the model does. Before, the converter's error ended the run
    after the model was saved."""
    import json
    import shutil
    from pathlib import Path

    import keras

    from formreader.reading.classify import convert_when_trained

    shipped = Path(classifier.path)
    out = tmp_path / "digits.keras"
    shutil.copy(shipped, out)
    meta = {k: v for k, v in json.loads(shipped.with_suffix(".json").read_text()).items() if not k.startswith("tflite")}
    out.with_suffix(".json").write_text(json.dumps(meta))
    said = []
    with monkeypatch.context() as m:
        m.setattr(keras.backend, "backend", lambda: "jax")
        convert_when_trained(out, meta, said.append)
    assert not out.with_suffix(".tflite").exists() and "first load" in said[0]
    loaded = DigitClassifier.load(out)
    assert out.with_suffix(".tflite").exists()
    x = np.random.default_rng(0).random((8, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(loaded.probabilities(x), classifier.probabilities(x), atol=1e-5)


def test_fine_tuning_on_string_pieces_runs(tmp_path, classifier):
    out = tmp_path / "tuned.keras"
    config = TrainConfig(epochs=1, limit=400, batch_size=64, strings=20, initial=str(classifier.path))
    meta = train_model(out, config, log=lambda *_: None)
    assert meta["train_images"] > 400  # the MNIST subset and the pieces
    assert DigitClassifier.load(out).probabilities(np.zeros((1, 28, 28), np.float32)).shape == (1, 11)


def test_string_pieces_are_labelled_by_whose_ink_they_hold(classifier, mnist_test):
    images, labels = mnist_test
    pieces, classes = make_string_pieces(60, np.random.default_rng(3), images, labels)
    assert len(pieces) == len(classes) and pieces.shape[1:] == (28, 28)
    digit = classes != NOT_A_DIGIT
    assert 100 < digit.sum() and 100 < (~digit).sum()  # right cuts and wrong cuts
    # An independent reader (the shipped model) agrees with the labels of the digit pieces...
    read = classifier.probabilities(pieces).argmax(1)
    assert (read[digit] == classes[digit]).mean() > 0.9


def test_augmentation_keeps_shape_and_range_and_changes_images(mnist_test):
    images, _ = mnist_test
    x = images[:64].astype(np.float32) / 255.0
    y = augment_batch(x, np.random.default_rng(0), stretch=0.15)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    changed = np.abs(y - x).reshape(64, -1).max(1) > 0.1
    assert 0.6 < changed.mean() < 1.0  # most are distorted, an eighth are left alone


def test_temperature_reduces_nll_on_held_out_data(classifier, mnist_test):
    images, labels = mnist_test
    logits = classifier.logits(images[:4000].astype(np.float32) / 255.0) * 3.0  # overconfident
    labels = labels[:4000].astype(np.int64)
    t = fit_temperature(logits[:2000], labels[:2000])
    assert t > 1.5
    assert nll(logits[2000:], labels[2000:], t) < nll(logits[2000:], labels[2000:])


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 3, (20000, 5))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(true_logits * 2.0, labels) == pytest.approx(2.0, rel=0.05)


def test_ece_on_a_known_case():
    # Four samples at confidence 0.9 (3 right) and two at 0.6 (1 right):
    # ECE = 4/6 * |0.75 - 0.9| + 2/6 * |0.5 - 0.6| = 0.1 + 0.0333
    p = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 1])
    assert expected_calibration_error(p, labels, bins=10) == pytest.approx(0.1 + 0.1 / 3)


def test_the_interval_of_a_rate_of_a_few_per_thousand():
    # Wilson's interval: 11 wrong fields of 2,160 (0.51%) could be 0.28-0.91% on the whole
    # population; none of 1,000 is not "none": up to z^2 / (n + z^2), 0.38%.
    low, high = rate_interval(11, 2160)
    assert (round(low, 4), round(high, 4)) == (0.0028, 0.0091)
    assert rate_interval(0, 1000) == (0.0, pytest.approx(1.96**2 / (1000 + 1.96**2)))
    assert rate_interval(110, 21600)[1] - rate_interval(110, 21600)[0] < (high - low) / 3  # ten times the fields


def test_confusion_and_risk_coverage_on_a_known_case():
    labels = np.array([0, 1, 2, 2])
    predicted = np.array([0, 2, 2, 2])
    m = confusion_matrix(labels, predicted, classes=3)
    assert m.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
    confidence = np.array([0.99, 0.5, 0.9, 0.8])
    correct = labels == predicted
    coverage, risk = risk_coverage(confidence, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == [0.0, 0.0, 0.0, 0.25]
    assert risk_at_coverage(confidence, correct, 0.75) == 0.0
    ev = evaluate_probabilities(np.array([[0.99, 0.01, 0], [0, 0.4, 0.6], [0.05, 0.05, 0.9], [0.1, 0.1, 0.8]]), labels)
    assert ev.accuracy == 0.75


def test_corrections_teach_a_style_the_model_misread(tmp_path, classifier, mnist_test):
    """`train --extra`: the 1s written with a long up-stroke that the model reads as 7 (CVL
    validation writers of the fixture), once corrected, are read as 1s; MNIST is not forgotten
    (>= 99.5% of its whole test set)."""
    import cv2

    from formreader.reading.segment import segment_crops
    from formreader.training.datasets import load_cvl

    x, y, _ = load_cvl("valid")
    images, index = segment_crops(x)
    labels = y[index]
    misread = np.flatnonzero((classifier.probabilities(images).argmax(1) == 7) & (labels == 1))
    assert len(misread) >= 3  # the style is there to correct
    folder = tmp_path / "corrections"
    for k in misread:
        (folder / "1").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "1" / f"{k}.png"), np.round(images[k] * 255).astype(np.uint8))
    out = tmp_path / "taught.keras"
    config = TrainConfig(epochs=2, limit=2000, batch_size=64, learning_rate=2e-4, initial=str(classifier.path), extra=str(folder))
    meta = train_model(out, config, log=lambda *_: None)
    assert meta["held_out"]["extra"]["digits"] == len(misread)
    taught = DigitClassifier.load(out)
    assert (taught.probabilities(images[misread]).argmax(1) == 1).all()
    mnist_x, mnist_y = mnist_test
    before, after = ((m.probabilities(mnist_x / 255.0).argmax(1) == mnist_y).mean() for m in (classifier, taught))
    # The whole MNIST test set (99.67% before), after a fine-tune that saw only the fixture's 2,000
    # MNIST training digits; on the full training data: benchmarks/evaluate_corrections.py. Such a
    # short fine-tune moves it by a tenth of a point either way (99.54% and 99.49% with the
    # training crops segmented at stop 24 and 25); forgetting costs whole points.
    assert after >= before - 0.0025


def test_a_labelled_folder_is_read_and_an_empty_one_refused(tmp_path, mnist_test):
    import cv2

    from formreader.training.train import labelled_digits

    images, labels = mnist_test
    for i in range(5):  # 28x28: the model's input, taken as it is
        (tmp_path / str(labels[i])).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / str(labels[i]) / f"{i}.png"), images[i])
    scanned = cv2.resize(255 - images[5], (90, 90), interpolation=cv2.INTER_CUBIC)  # a crop: segmented first
    (tmp_path / str(labels[5])).mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / str(labels[5]) / "crop.png"), scanned)
    x, y = labelled_digits(tmp_path)
    assert x.shape == (6, 28, 28) and sorted(y.tolist()) == sorted(labels[:6].tolist())
    assert any(np.allclose(img, images[0] / 255.0, atol=1e-6) for img in x)  # taken as it is
    with pytest.raises(ValueError, match="no labelled digits"):
        labelled_digits(tmp_path / "nothing")


def test_evaluate_shows_a_model_before_and_after(tmp_path):
    """`formreader evaluate --before OLD`: both models' figures on the same held-out sources
    (the shipped model against itself gives the same table twice)."""
    from formreader.reading.classify import MODELS

    run = run_cli("evaluate", "--before", MODELS / "digits.keras", "--plots", tmp_path)
    assert run.returncode == 0, run.stderr
    after, before = run.stdout.split("Writers never trained on")[1].split("Before (")
    pair, alone = after.split("The digit network alone, without digits.companion.keras")
    table = lambda text: [line for line in text.splitlines() if line.startswith(("MNIST test", "CVL validation"))]  # noqa: E731
    assert table(pair) and table(pair) == table(before)  # read_digits reads with the pair
    assert len(table(pair)) == len(table(alone)) and table(pair) != table(alone)  # the network alone reads otherwise


def test_narrow_augmentation_squeezes_digits_sideways(mnist_test):
    images, labels = mnist_test
    x = images[labels == 0][:64].astype(np.float32) / 255.0  # round digits: their width shows
    width = lambda batch: (batch.max(1) > 0.3).sum(1).mean()  # noqa: E731  inked columns
    plain = augment_batch(x, np.random.default_rng(1))
    narrow = augment_batch(x, np.random.default_rng(1), narrow=1.0)
    assert width(narrow) < 0.85 * width(plain)
    assert abs((narrow.max(2) > 0.3).sum(1).mean() - (plain.max(2) > 0.3).sum(1).mean()) < 1.5  # height kept


def test_field_calibration_draws_on_three_populations_of_validation_writers(classifier):
    """`formreader calibrate` fits field confidence on forms written by the model's own
    validation writers of MNIST, CVL and ORAND (as its card lists them), never on test writers."""
    from formreader.training.evaluate import calibrate_fields, calibration_forms
    from formreader.training.synth import FORM_STYLES

    forms = calibration_forms(classifier.meta, pages=1, seed=3)
    assert len(forms) == 3 * len(FORM_STYLES)  # MNIST, CVL and ORAND validation digits, every style
    assert [(source.split()[0], style) for source, style, *_ in forms] == [
        (source, style) for source in ("MNIST", "CVL's", "ORAND's") for style in FORM_STYLES
    ]
    result = calibrate_fields(classifier, pages=2)
    assert result["fields"] >= 2 * len(forms)
    # Bitonal scans (one style in three) get an exponent of their own.
    assert 0 < result["bitonal_fields"] < result["fields"]
    assert 0.2 < result["field_power"] < 5 and 0.2 < result["field_power_bitonal"] < 5
    assert classifier.field_power(True) == classifier.meta["field_power_bitonal"] != classifier.field_power(False)
    # The review threshold lets out at most REVIEW_RISK of these fields wrong (here, with so few, none),
    # and is no higher than it must be: a threshold only flags.
    assert 0.0 <= result["review_threshold"] <= 1.0
    assert result["wrong_not_flagged"] <= int(REVIEW_RISK * result["boxed_fields"])
    assert 0.0 < result["flagged"] < 1.0
    # And one for each risk a template may accept (its review_risk): the more risk, the lower.
    table = [result["review_thresholds"][f"{r:g}"] for r in REVIEW_RISKS]
    assert table == sorted(table, reverse=True) and result["review_thresholds"]["0.003"] == result["review_threshold"]
    # A user who accepts more wrong fields (`formreader calibrate --risk`) gets a threshold no higher.
    loose = calibrate_fields(classifier, pages=2, risk=0.1)
    assert loose["field_power"] == result["field_power"]
    assert loose["review_threshold"] <= result["review_threshold"] and loose["flagged"] <= result["flagged"]
    assert result["wrong_not_flagged"] <= loose["wrong_not_flagged"] <= int(0.1 * loose["boxed_fields"])


def test_field_confidence_is_fitted_for_the_least_sure_population_of_writers(classifier):
    """Each source of validation writers with enough fields of a kind of scan gets its own
    confidence exponent, and the largest is the model's: with it no source is over-confident
    (none would be fitted better by raising its confidences to a higher power), where the
    exponent fitted to all of them pooled leaves the hardest one over-confident."""
    from formreader.training.evaluate import calibration_forms, calibration_records, fit_field_decision, fit_power

    forms = calibration_forms(classifier.meta, pages=3, seed=5)
    records, sources = calibration_records(forms, {"": classifier.cell_probabilities})
    right, confidence, ruled, bitonal = records[""]
    assert len(sources) == len(right) and set(sources) == {source for source, *_ in forms}
    fitted = fit_field_decision(right, confidence, ruled, bitonal, sources=sources, min_fields=10)
    pooled = fit_field_decision(right, confidence, ruled, bitonal)
    assert pooled["source_powers"] is None
    for kind, key in ((False, "field_power"), (True, "field_power_bitonal")):
        chosen = fitted[key]
        own = [powers[int(kind)] for powers in fitted["source_powers"].values() if powers[int(kind)] is not None]
        assert len(own) >= 2 and chosen == pytest.approx(max(own), abs=1e-4)
        assert chosen >= pooled[key]
        for source in fitted["source_powers"]:
            one = ~ruled & (bitonal == kind) & (sources == source)
            if one.sum() >= 10:
                assert fit_power(confidence[one] ** chosen, right[one]) <= 1.001  # not over-confident


def test_the_pair_is_calibrated_on_the_models_validation_split(classifier, monkeypatch):
    """`formreader calibrate` fits the temperature of the two networks' mean on the model's own
    validation split (its MNIST digits, the CVL writers and ORAND checks its card holds out, and
    not-a-digit ink), never on test writers, and that temperature fits the split better than the
    mean as it comes."""
    import formreader.training.train as train
    from formreader.training.evaluate import fit_pair_temperature

    built, build = [], train.build_training_data
    monkeypatch.setattr(train, "build_training_data", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    temperature = fit_pair_temperature(classifier)
    val = built[0]
    assert {train.SOURCES[s] for s in np.unique(val.source_val)} == {"mnist", "cvl", "orand", "not_a_digit"}
    assert val.held_out["cvl_validation_writers"] == classifier.meta["held_out"]["cvl_validation_writers"]
    logp = np.log(np.maximum(classifier.pair_mean(val.x_val), 1e-12))
    assert 0.5 < temperature < 2 and abs(temperature - 1) > 0.01
    assert nll(logp, val.y_val, temperature) < nll(logp, val.y_val, 1.0)


def test_scanned_copies_look_like_a_scanned_forms_cells(classifier, mnist_test):
    images, labels = mnist_test
    x = images[:300].astype(np.float32) / 255.0
    edges = {}
    for share in (0.0, 1.0):  # grey scans, then bitonal ones
        copies, kept = scanned_copies(x, np.random.default_rng(5), bitonal_share=share)
        assert copies.shape == (len(kept), 28, 28) and len(kept) > 0.97 * len(x)
        assert np.abs(copies - x[kept]).reshape(len(kept), -1).max(1).mean() > 0.5  # not the images given
        # Still the same digits (an independent reader agrees), as a scan of them is.
        assert (classifier.probabilities(copies).argmax(1) == labels[kept]).mean() > 0.95
        edges[share] = ((copies > 0.1) & (copies < 0.9)).mean()  # grey pixels at the strokes' edges
    # A bitonal scan is 0 or 255: its strokes' edges stay harder once normalised.
    assert edges[1.0] < 0.85 * edges[0.0]


def test_scanned_copies_join_both_splits_with_their_labels_and_sources(mnist_test, monkeypatch):
    """Validation gets copies too (early stopping and the temperature then weigh scanned cells),
    each with its original's label and source, also when the scan wipes some digits out."""
    import formreader.training.train as train

    # A "scan" that keeps every other digit unchanged: each copy can be traced to its original.
    monkeypatch.setattr(train, "scanned_copies", lambda images, rng: (images[::2], np.arange(0, len(images), 2)))
    images, labels = mnist_test
    x = images[:200].astype(np.float32) / 255.0
    y = labels[:200].astype(np.int32)
    y[:20] = NOT_A_DIGIT  # not-a-digit examples get no copies
    source = np.arange(200, dtype=np.uint8) % 3
    data = train.TrainingData(x[:150], y[:150], source[:150], x[150:], y[150:], source[150:], {})
    out = train.with_scanned_copies(data, 0.5, np.random.default_rng(0))
    for split in ("train", "val"):
        x0, y0, s0 = (getattr(data, f"{k}_{split}") for k in ("x", "y", "source"))
        x1, y1, s1 = (getattr(out, f"{k}_{split}") for k in ("x", "y", "source"))
        n = len(y0)
        assert np.array_equal(x1[:n], x0) and np.array_equal(y1[:n], y0) and np.array_equal(s1[:n], s0)
        assert len(y1) - n == (int(0.5 * (y0 < NOT_A_DIGIT).sum()) + 1) // 2 > 0
        for copy, label, src in zip(x1[n:], y1[n:], s1[n:]):
            original = int(np.flatnonzero((x0 == copy).all(axis=(1, 2)))[0])
            assert (label, src) == (y0[original], s0[original]) and label != NOT_A_DIGIT


def test_a_card_written_by_an_older_version_still_gives_its_validation_writers(classifier):
    """Cards record their training options; one this version no longer has (`bitonal`, before
    stop 23) must not stop `formreader calibrate` from finding the model's validation split."""
    from formreader.training.evaluate import calibration_forms
    from formreader.training.train import TrainConfig

    old = {k: v for k, v in classifier.meta["config"].items() if k != "scanned"} | {"bitonal": 0.3}
    assert TrainConfig.from_card(old) == TrainConfig.from_card(classifier.meta["config"] | {"scanned": 0.0})
    forms = calibration_forms(classifier.meta | {"config": old}, pages=1, seed=3)
    assert [source for source, *_ in forms] == [source for source, *_ in calibration_forms(classifier.meta, 1, 3)]


def test_a_kinds_thresholds_are_its_own_unless_they_rest_on_too_few_fields():
    """calibrate-strings chooses free fields' thresholds on each kind of paper's validation fields
    alone (thresholds_by_document), so that a check template's risk is held on checks' fields; a
    risk that lets fewer than three of a kind's fields out wrong keeps the stricter of the kind's
    and all fields' threshold, rather than rest on one or two fields. Here the checks' wrong
    readings are unsure ones and the forms' wrong readings sure ones, as a worse-read population's are."""
    from formreader.training.evaluate import MIN_WRONG_LET_OUT, risk_threshold, thresholds_by_document

    rng = np.random.default_rng(5)
    checks, forms = 400, 700
    confidence = np.concatenate([rng.uniform(0.5, 1.0, checks), rng.uniform(0.5, 1.0, forms)])
    right = np.concatenate([confidence[:checks] > 0.6, rng.random(forms) > 0.1])
    ruled = np.zeros(checks + forms, bool)
    documents = np.array(["check"] * checks + ["form"] * forms)
    chosen = thresholds_by_document(confidence, right, ruled, documents)
    of = documents == "check"
    for risk in ("0.003", "0.01", "0.05"):
        own = risk_threshold(confidence[of], right[of], ruled[of], float(risk))
        everyone = risk_threshold(confidence, right, ruled, float(risk))
        assert own < everyone  # the checks' unsure misreadings let a lower threshold hold the risk
        enough = np.floor(float(risk) * checks) >= MIN_WRONG_LET_OUT
        assert chosen["check"][risk] == (own if enough else everyone)
    assert chosen["form"]["0.05"] == risk_threshold(confidence[~of], right[~of], ruled[~of], 0.05) >= chosen["check"]["0.05"]
    assert set(chosen) == {"check", "form"} and list(chosen["form"]) == [f"{r:g}" for r in REVIEW_RISKS]


def test_the_struck_digit_detector_trains_and_loads_beside_its_digit_model(tmp_path):
    """`train-struck` on a few forms of the fixtures' training writers: a detector whose card holds
    the thresholds chosen on validation forms (boxed cells, free fields), the share of them each
    flags and what it was trained on; the digit model loads it from beside itself; a second run
    asks for --force."""
    import json
    import shutil

    from formreader.reading.classify import DEFAULT_MODEL

    for suffix in (".keras", ".json", ".tflite"):
        shutil.copy(DEFAULT_MODEL.with_suffix(suffix), tmp_path / f"digits{suffix}")
    out = tmp_path / "digits.struck.keras"
    args = ("train-struck", "--pages", 2, "--epochs", 1, "--validation-pages", 2, "--out", out)
    run = run_cli(*args)
    assert run.returncode == 0, run.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert 0 < card["struck_threshold"] < 1 and card["cells"] > 100
    assert card["validation"]["fields"] > 0 and card["validation"]["flagged_share"] <= 0.05
    assert 0 < card["struck_free_threshold"] < 1 and card["free_digits"] > 100  # free fields' digits, framed alike
    free = card["validation_free"]
    assert free["fields"] > 0 and free["flagged_share"] <= 0.05 and free["struck_fields"] > 0
    assert "voiding_strokes" in card["trained_on"]
    clf = DigitClassifier.load(tmp_path / "digits.keras")
    assert clf.struck is not None and clf.struck.threshold == card["struck_threshold"]
    assert clf.struck.free_threshold == card["struck_free_threshold"]
    scores = clf.struck.probabilities(np.zeros((3, 32, 32), np.float32))
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    again = run_cli(*args)
    assert again.returncode == 2 and "--force" in again.stderr


def test_the_struck_threshold_is_the_lowest_that_flags_the_share_allowed():
    from formreader.training.train_struck import lowest_threshold

    scores = np.random.default_rng(0).random(1000)
    t = lowest_threshold(scores, 0.01)
    assert (scores >= t).sum() == 10 and (scores >= np.sort(scores)[-11]).sum() == 11
    tied = np.r_[np.zeros(990), np.full(10, 0.5)]
    assert (tied >= lowest_threshold(tied, 0.005)).sum() == 0  # ten alike: all or none, and ten are too many


def test_the_struck_detector_trains_on_the_digit_models_training_writers_only(classifier):
    """Its training forms are written by the writers the digit model trained on: CVL's validation
    writers, the model's MNIST validation split and ORAND's held-out checks stay out, so that the
    threshold chosen on their forms is chosen on writers neither network has seen."""
    from formreader.training.datasets import load_cvl, load_mnist, load_orand, orand_digit_crops
    from formreader.training.train import mnist_split
    from formreader.training.train_struck import training_writers

    sources = training_writers(classifier.meta)
    x, y, writers = load_cvl("train")
    held = np.isin(writers, classifier.meta["held_out"]["cvl_validation_writers"])
    assert held.any() and len(sources["CVL"][1]) == (~held).sum()
    assert (np.sort(sources["CVL"][1]) == np.sort(y[~held])).all()
    config = TrainConfig.from_card(classifier.meta["config"])
    val, train = mnist_split(len(load_mnist("train", download=False)[0]), config, np.random.default_rng(config.seed))
    assert len(sources["MNIST"][1]) == len(train) and len(val) > 0
    assert len(sources["ORAND"][1]) == len(orand_digit_crops(load_orand("train"))[1]) > 0
    assert not set(classifier.meta["held_out"]["orand_validation_checks"]) & {a.name for a in load_orand("train")}
