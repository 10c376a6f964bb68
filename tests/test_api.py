"""The Python API: read_digits on real scanned crops, process_folder to a DataFrame."""

from __future__ import annotations

import numpy as np
import pytest

import formreader
from formreader.training.datasets import load_nsysu

from .conftest import SCANS, TEMPLATE


def test_read_digits_on_real_exam_box_crops():
    crops, labels, _ = load_nsysu()
    idx = np.random.default_rng(1).choice(len(crops), 400, replace=False)
    readings = formreader.read_digits([crops[i] for i in idx])
    assert len(readings) == 400
    accuracy = np.mean([r.digit == str(labels[i]) for r, i in zip(readings, idx)])
    assert accuracy >= 0.9
    assert all(0 <= r.confidence <= 1 for r in readings)


def test_read_digits_reads_each_crop_as_a_forms_boxed_cell_is(classifier, monkeypatch):
    """read_digits gives each digit the probabilities a form's boxed cell gets: the digit network's
    and its companion's, calibrated as a pair (DigitClassifier.cell_probabilities), not the digit
    network's alone; in chunks classified by several one-thread interpreters at once, each
    reading where its crop is."""
    from formreader.reading.segment import segment_crops

    # Seven chunks, each cut in parts for the cores: more parts than the cores wait at once.
    monkeypatch.setattr(formreader.api, "READ_CHUNK", 48)
    monkeypatch.setattr(formreader.api, "READ_BATCH", 16)
    crops = list(load_nsysu()[0][:300])
    images, index = segment_crops(crops)
    readings = formreader.read_digits(crops)
    pair, alone = classifier.cell_probabilities(images), classifier.probabilities(images)
    assert np.allclose([readings[i].probabilities for i in index], pair, atol=1e-6)
    assert not np.allclose(pair, alone, atol=1e-3)


def test_read_digits_any_size_and_blank():
    crops, labels, _ = load_nsysu()
    import cv2

    big = cv2.resize(crops[10], (90, 110), interpolation=cv2.INTER_CUBIC)
    blank = np.full((50, 40), 250, np.uint8)
    got_big, got_blank = formreader.read_digits([big, blank])
    assert got_big.digit == str(labels[10])
    assert got_blank.digit == ""


def test_read_digits_takes_arrays_as_programs_hold_them(mnist_test):
    """MNIST's own arrays (light ink on dark), floats in 0-1 or -1 to 1 (as USPS's digits come),
    RGB, 16-bit and bool crops, and masks of 0 and 1 stored as uint8, read as the same digits as
    dark-on-light uint8. Before, MNIST's arrays read 6% right, 60% judged blank, and float crops
    all came back blank with confidence 1.0: no digit, said with certainty (uint8 masks until
    stop 39: their one grey level of contrast read as blank paper)."""
    import cv2

    images, labels = mnist_test
    x, truth = images[:200], labels[:200].astype(str)
    paper = list(255 - x)
    forms = {
        "light on dark": list(x),
        "float 0-1": [c / 255.0 for c in paper],
        "float -1 to 1, light on dark": [c / 127.5 - 1 for c in x],
        "RGB": [cv2.cvtColor(c, cv2.COLOR_GRAY2RGB) for c in paper],
        "uint16": [c.astype(np.uint16) * 257 for c in paper],
        "bool ink": [c > 128 for c in x],
        "uint8 mask of 0 and 1 (1: ink)": [(c > 128).astype(np.uint8) for c in x],
    }
    expected = np.array([r.digit for r in formreader.read_digits(paper)])
    assert (expected == truth).mean() >= 0.98
    for name, crops in forms.items():
        got = np.array([r.digit for r in formreader.read_digits(crops)])
        assert (got == expected).mean() >= 0.98, name
        assert (got == truth).mean() >= 0.97, name


def test_usps_style_digits_light_on_dark_and_cut_tight_read_as_dark_on_light(mnist_test):
    """USPS's digits come 16x16, cut tight, light ink on dark in -1 to 1: a bold 0 or 8 then covers
    most of its crop, and alone it cannot say which level is the paper. Handed in together, the
    crops of one shape are taken as one source's, and read as the same digits dark on light
    (before, 98.9% of 2,000 such MNIST digits read right against 99.6%)."""
    from formreader.training.evaluate import cut_tight

    images, labels = mnist_test
    idx = np.random.default_rng(0).choice(len(images), 2000, replace=False)
    tight = [cut_tight(255 - images[k]) for k in idx]
    dark_on_light = np.array([r.digit for r in formreader.read_digits(tight)])
    usps = np.array([r.digit for r in formreader.read_digits([(255 - t.astype(np.float32)) / 127.5 - 1 for t in tight])])
    assert (dark_on_light == labels[idx].astype(str)).mean() >= 0.99
    assert (usps == dark_on_light).mean() >= 0.998


def test_read_digits_names_the_crop_that_is_no_image(mnist_test):
    images, _ = mnist_test
    for bad, says in (
        (np.zeros((0, 5)), "empty"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.zeros((4, 4, 2)), "shape"),
        (np.full((9, 9), -3.0), "negative"),
    ):
        with pytest.raises(ValueError, match=f"crop 1: .*{says}"):
            formreader.read_digits([255 - images[0], bad])


def test_a_small_digit_in_a_loose_crop_is_read_and_unreadable_ink_is_no_blank(mnist_test):
    """A digit 20 px tall in a crop four times MNIST's (112 px) is a digit, as in a box: before,
    every one came back blank (no digit, confidence 0.999), its height under a fifth of the crop.
    Ink that holds no digit (dots too small to be one) reads '?' at low confidence, as a form's
    cell does, not blank."""
    import cv2

    images, labels = mnist_test
    loose = [cv2.copyMakeBorder(255 - c, 42, 42, 42, 42, cv2.BORDER_CONSTANT, value=255) for c in images[:300]]
    read = np.array([r.digit for r in formreader.read_digits(loose)])
    assert (read == labels[:300].astype(str)).mean() >= 0.98
    dots = np.full((40, 40), 250, np.uint8)
    for x, y in ((6, 8), (20, 30), (33, 12), (12, 22), (30, 33)):
        cv2.circle(dots, (x, y), 2, 40, -1)
    blank = np.full((40, 40), 250, np.uint8)
    got_dots, got_blank = formreader.read_digits([dots, blank])
    assert got_dots.digit == "?" and got_dots.confidence <= 0.2
    assert got_blank.digit == "" and got_blank.confidence >= 0.99


def test_process_folder_returns_a_dataframe():
    df = formreader.process_folder(SCANS, TEMPLATE)
    assert len(df) == 60 and {"file", "page", "field", "value", "confidence", "status"} <= set(df.columns)
    assert df.attrs["errors"].empty and len(df.attrs["wide"]) == 10
