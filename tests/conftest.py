"""Shared fixtures: the shipped template, model and samples, and real MNIST test digits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "templates" / "demo_form.yaml"
SCANS = ROOT / "samples" / "scans"


@pytest.fixture(scope="session")
def template():
    from formreader.template import load_template

    return load_template(TEMPLATE)


@pytest.fixture(scope="session")
def classifier():
    from formreader.classify import DigitClassifier

    return DigitClassifier.load()


@pytest.fixture(scope="session")
def mnist_test():
    from formreader.datasets import load_mnist

    return load_mnist("test", download=False)


@pytest.fixture(scope="session")
def truth() -> pd.DataFrame:
    return pd.read_csv(ROOT / "samples" / "truth.csv", dtype={"value": str}, keep_default_na=False)


@pytest.fixture(scope="session")
def filled_pages(mnist_test):
    """Eight filled demo forms (unscanned) with ground truth, from MNIST test digits."""
    from formreader.synth import make_pages

    images, labels = mnist_test
    # A seed other than the samples', so these pages are not the shipped ones.
    blank, fields, pages = make_pages(8, seed=4242, images=images, labels=labels)
    return blank, fields, pages


def field_accuracy(records: list[dict], truth: pd.DataFrame) -> tuple[int, int, int, int]:
    """(right, total, flagged, wrong and not flagged) of page records against a truth table."""
    expected = {(Path(r.file).name, int(r.page), r.field): r.value for r in truth.itertuples()}
    right = total = flagged = wrong_unflagged = 0
    for rec in records:
        for f in rec["fields"]:
            key = (Path(rec["source"]).name, rec["page"], f["field"])
            ok = f["value"] == expected[key]
            total += 1
            right += ok
            flagged += f["status"] != "ok"
            wrong_unflagged += (not ok) and f["status"] == "ok"
    return right, total, flagged, wrong_unflagged


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
