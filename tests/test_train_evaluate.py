"""Training end to end on a small subset, calibration, and the evaluation figures."""

from __future__ import annotations

import numpy as np
import pytest

from formreader.classify import NOT_A_DIGIT, DigitClassifier
from formreader.evaluate import (
    confusion_matrix,
    evaluate_probabilities,
    expected_calibration_error,
    risk_at_coverage,
    risk_coverage,
)
from formreader.train import TrainConfig, augment_batch, fit_temperature, make_string_pieces, nll, train_model


def test_training_runs_end_to_end_on_a_subset(tmp_path):
    out = tmp_path / "tiny.keras"
    meta = train_model(out, TrainConfig(epochs=1, limit=400, batch_size=64), log=lambda *_: None)
    assert out.exists() and out.with_suffix(".json").exists()
    assert meta["epochs_run"] == 1 and meta["temperature"] > 0
    clf = DigitClassifier.load(out)
    p = clf.probabilities(np.zeros((3, 28, 28), np.float32))
    assert p.shape == (3, 11)


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
