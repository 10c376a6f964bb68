"""The Python API: read_digits on real scanned crops, process_folder to a DataFrame."""

from __future__ import annotations

import numpy as np

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


def test_read_digits_any_size_and_blank():
    crops, labels, _ = load_nsysu()
    import cv2

    big = cv2.resize(crops[10], (90, 110), interpolation=cv2.INTER_CUBIC)
    blank = np.full((50, 40), 250, np.uint8)
    got_big, got_blank = formreader.read_digits([big, blank])
    assert got_big.digit == str(labels[10])
    assert got_blank.digit == ""


def test_process_folder_returns_a_dataframe():
    df = formreader.process_folder(SCANS, TEMPLATE)
    assert len(df) == 60 and {"file", "page", "field", "value", "confidence", "status"} <= set(df.columns)
    assert df.attrs["errors"].empty and len(df.attrs["wide"]) == 10
