"""The classifier: the fast path equals the Keras model; accuracy; rejection; bad model files."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from formreader.reading.classify import DEFAULT_MODEL, DigitClassifier, ModelError, load_keras_model, softmax
from formreader.training.model import NOT_A_DIGIT
from formreader.training.train import make_non_digits


def test_fast_path_matches_keras_model(classifier, mnist_test):
    """The quantised fast path (int8 weights) reads as the Keras model: the same digit, and
    probabilities that differ by a fraction of a point at most (2.4e-5 on average, 0.028 at most
    on 4,000 MNIST test digits when measured)."""
    images, _ = mnist_test
    x = images[:512].astype(np.float32) / 255.0
    keras_logits = load_keras_model(DEFAULT_MODEL).predict(x[..., None], batch_size=128, verbose=0)
    fast_logits = classifier.logits(x)
    assert np.array_equal(keras_logits.argmax(1), fast_logits.argmax(1))
    difference = np.abs(softmax(keras_logits) - softmax(fast_logits))
    assert difference.max() < 0.03 and difference.mean() < 1e-4


def test_batch_size_does_not_change_results(classifier, mnist_test):
    images, _ = mnist_test
    x = images[:300].astype(np.float32) / 255.0
    one_by_one = np.concatenate([classifier.probabilities(x[i : i + 1]) for i in range(0, 300, 37)])
    batched = classifier.probabilities(x, batch_size=256)[::37]
    assert np.allclose(one_by_one, batched, atol=1e-5)


def test_accuracy_on_mnist_test_sample(classifier, mnist_test):
    images, labels = mnist_test
    idx = np.random.default_rng(0).choice(len(images), 3000, replace=False)
    p = classifier.probabilities(images[idx].astype(np.float32) / 255.0)
    assert p.shape == (3000, 11) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == labels[idx]).mean() >= 0.99


def test_not_digits_get_no_confident_digit(classifier):
    junk = make_non_digits(300, np.random.default_rng(99))  # a seed training never used
    p = classifier.probabilities(junk)
    confident_digit = (p[:, :NOT_A_DIGIT].max(1) > 0.9).mean()
    assert confident_digit < 0.05
    assert (p.argmax(1) == NOT_A_DIGIT).mean() > 0.9


def test_blank_input_is_not_a_confident_digit(classifier):
    p = classifier.probabilities(np.zeros((1, 28, 28), np.float32))
    assert p[0, :NOT_A_DIGIT].max() < 0.9


def test_classifier_pickles_for_process_pools(classifier, mnist_test):
    images, _ = mnist_test
    x = images[:8].astype(np.float32) / 255.0
    clone = pickle.loads(pickle.dumps(classifier))
    assert np.allclose(clone.probabilities(x), classifier.probabilities(x))


def copy_model(tmp_path):
    shutil.copy(DEFAULT_MODEL, tmp_path / "m.keras")
    shutil.copy(DEFAULT_MODEL.with_suffix(".json"), tmp_path / "m.json")
    return tmp_path / "m.keras"


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found: .*nothing.keras"):
        DigitClassifier.load(tmp_path / "nothing.keras")


def test_corrupt_model_file(tmp_path):
    path = copy_model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot be loaded"):
        DigitClassifier.load(path)


def test_model_card_without_temperature(tmp_path):
    path = copy_model(tmp_path)
    path.with_suffix(".json").write_text(json.dumps({"classes": []}))
    with pytest.raises(ModelError, match="temperature"):
        DigitClassifier.load(path)


def test_the_companion_reads_only_the_cells_the_digit_network_is_unsure_of(classifier, monkeypatch):
    """Boxed cells: the digit network's probabilities where it is at least the card's
    companion_gate sure, the two networks' mean elsewhere, and the companion run on those alone.
    On writers neither network saw (the CVL validation and NSYSU fixtures) the readings are the
    full pair's, cell for cell; the mean is then calibrated by the card's pair_temperature, which
    changes how sure a reading is, never what it reads."""
    from formreader.reading.classify import softmax
    from formreader.reading.segment import segment_crops
    from formreader.training.datasets import load_cvl, load_nsysu

    crops = np.concatenate([load_cvl("valid")[0][:150], load_nsysu()[0][:150]])
    images, _ = segment_crops(list(crops))
    gate = classifier.meta["companion_gate"]
    alone = classifier.probabilities(images)
    pair = (alone + classifier.companion.probabilities(images)) / 2
    sure = alone.max(1) >= gate
    assert 0.2 < sure.mean() < 0.95  # both kinds of cell are here
    asked = []
    companion_probabilities = classifier.companion.probabilities
    monkeypatch.setattr(classifier.companion, "probabilities", lambda x: asked.append(len(x)) or companion_probabilities(x))
    mean = classifier.pair_mean(images)
    assert asked == [int((~sure).sum())]
    assert np.array_equal(mean[sure], alone[sure])
    assert np.allclose(mean[~sure], pair[~sure], atol=1e-6)
    assert np.array_equal(mean.argmax(1), pair.argmax(1))
    cells = classifier.cell_probabilities(images)
    temperature = classifier.meta["pair_temperature"]
    assert np.allclose(cells, softmax(np.log(np.maximum(mean, 1e-12)), temperature), atol=1e-6)
    assert np.array_equal(cells.argmax(1), mean.argmax(1)) and not np.allclose(cells, mean, atol=1e-3)


def test_a_one_thread_copy_holds_one_thread_copies_of_every_model_it_holds(classifier):
    """Workers read with one-thread interpreters (as many workers as cores): a held model left at
    several threads (the struck-digit detector was, at first) stalls whenever another takes its core."""
    from formreader.reading.classify import HELD_MODELS, single_threaded

    one = single_threaded(classifier)
    held = [getattr(one, k) for k in HELD_MODELS if getattr(classifier, k, None) is not None]
    assert one.threads == 1 and len(held) == 4 and all(m.threads == 1 for m in held)
    assert one.struck.threshold == classifier.struck.threshold
