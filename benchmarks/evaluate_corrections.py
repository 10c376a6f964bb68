"""Corrections that teach: what `formreader train --extra` makes of a clerk's corrections.

    python benchmarks/evaluate_corrections.py [--prepared .accel/splits.npz] [--epochs 1] [--source nsysu] [--teach all]
    python benchmarks/evaluate_corrections.py --source nsysu --teach all --write-corrections DIR
    python benchmarks/evaluate_corrections.py --source nsysu --forms TAUGHT/digits.keras

CVL's validation writers (never trained on) are split in two halves by writer. The digits of
the first half that the shipped model misreads are the "corrections" (labelled 28x28 crops, as
the review station saves them); the model is fine-tuned on them with its full training data
(`train --initial models/digits.keras --extra DIR`). Prints, before and after: MNIST test
accuracy (the whole 10,000), the second half's accuracy (writers neither model saw: does
what was taught carry over?), and how many of the corrections themselves are read right.
With `--source nsysu`, an office of writers unlike any trained on: NSYSU's exams split in two
by term (the first four characters of the exam id, `1081`: a term's students are not another
term's), the other terms measured, and CVL's validation writers beside MNIST for what the
fine-tune may cost elsewhere. `--teach all` teaches every digit of the first half (a clerk who
checked each field confirms the right readings and corrects the rest), `--teach none` nothing:
the fine-tune alone, to compare with. `--write-corrections DIR` only writes the digits taught, as
the review station's corrections folder holds them, for the README's recipe ("Corrections
teach": both networks fine-tuned, `formreader calibrate`); `--forms MODEL` then reads forms
written by the writers not corrected (the three forms of `evaluate_forms.py`, 40 pages each, seed
777) with the shipped models and with MODEL, as their templates' fields are decided.
Needs TensorFlow and the data sets (../shared/data or FORMREADER_DATA).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from formreader.reading.classify import DigitClassifier  # noqa: E402
from formreader.reading.segment import segment_crops  # noqa: E402
from formreader.training.datasets import load_cvl, load_mnist, load_nsysu  # noqa: E402
from formreader.training.train import TrainConfig, TrainingData, train_model  # noqa: E402


def accuracy(clf: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((clf.probabilities(images).argmax(1) == labels).mean()) if len(labels) else float("nan")


def office(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The writers who correct and are measured: their crops (N, H, W), labels (N,), and whether
    each crop is of the first half, whose digits are taught (N,) bool."""
    x, y, groups = load_nsysu() if source == "nsysu" else load_cvl("valid")
    if source == "nsysu":
        groups = np.array([str(e)[:4] for e in groups])  # the term: its writers are not the other terms'
    ids = np.unique(groups)
    return x, y, np.isin(groups, np.random.default_rng(7).permutation(ids)[: len(ids) // 2])


def write_digits(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """28x28 digits (N, 28, 28) float as the review station's corrections folder holds them: LABEL/K.png."""
    for k, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / str(label) / f"{k}.png"), np.round(image * 255).astype(np.uint8))


def read_forms(model: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Forms written by these crops' writers, read by the shipped models and by `model`."""
    from evaluate_forms import pooled, read_at_threshold

    from formreader.training.synth import FORM_STYLES, ink_on_black, scanned_forms

    glyphs, labels = ink_on_black(x, y)
    forms = [scanned_forms(style, glyphs, labels, 40, 777) for style in FORM_STYLES]
    print(f"{'':28s}{'form':40s}{'fields':>7s}{'right':>9s}{'flagged':>9s}{'wrong but ok':>14s}")
    for name, clf in (("shipped", DigitClassifier.load()), (str(model), DigitClassifier.load(model))):
        scores = [read_at_threshold(items, template, clf) for template, items in forms]
        for style, s in zip(FORM_STYLES, scores):
            print(f"{name[-26:]:28s}{style:40s}{s['fields']:7d}{s['accuracy']:9.2%}{s['flagged']:9.1%}{s['wrong_unflagged']:14d}")
        n, right, flagged, wrong_ok = pooled(scores)
        everything = f"all (threshold {clf.review_threshold})"
        print(f"{name[-26:]:28s}{everything:40s}{n:7d}{right:9.2%}{flagged:9.1%}{wrong_ok:14d}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepared", type=Path, help="the prepared training splits (.npz) of `train --prepared`")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--source", choices=["cvl", "nsysu"], default="cvl", help="whose writers correct and are measured")
    parser.add_argument(
        "--teach",
        choices=["misread", "all", "none"],
        default="misread",
        help="the first half's digits taught: those misread, or all (a clerk who checked every field confirms the rest), "
        "or none (the fine-tune alone, to compare with)",
    )
    parser.add_argument("--write-corrections", type=Path, metavar="DIR", help="write the digits taught there and stop")
    parser.add_argument("--forms", type=Path, metavar="MODEL", help="read forms of the writers not corrected with MODEL and stop")
    args = parser.parse_args()
    x, y, first_crops = office(args.source)
    if args.forms:
        read_forms(args.forms, x[~first_crops], y[~first_crops])
        return
    before = DigitClassifier.load()
    images, index = segment_crops(x)
    labels, first = y[index], first_crops[index]
    wrong = first & (before.probabilities(images).argmax(1) != labels)
    taught = {"all": first, "misread": wrong, "none": np.zeros_like(first)}[args.teach]
    if args.write_corrections:
        write_digits(args.write_corrections, images[taught], labels[taught])
        print(f"{int(taught.sum())} digits written to {args.write_corrections}")
        return
    mnist_x, mnist_y = load_mnist("test", download=False)
    mnist = mnist_x.astype(np.float32) / 255.0
    who = "NSYSU terms" if args.source == "nsysu" else "CVL validation writers"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corrections"
        write_digits(folder, images[taught], labels[taught])
        extra = str(folder) if taught.any() else None
        config = TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, initial=str(before.path), extra=extra)
        data = TrainingData.load(args.prepared) if args.prepared else None
        out = Path(tmp) / "tuned.keras"
        meta = train_model(out, config, data=data, log=lambda *a: None)
        after = DigitClassifier.load(out)
        print(f"{int(taught.sum())} digits taught ({int(wrong.sum())} corrected) from the first half of the {who}; "
              f"fine-tuned {meta['epochs_run']} epoch(s) in {meta['training_seconds']:.0f} s on {meta['train_images']} images")
        print(f"{'':52s}{'before':>10s}{'after':>10s}")
        rows = [
            ("MNIST test (10,000)", mnist, mnist_y),
            (f"{who} not corrected ({int((~first).sum())} digits)", images[~first], labels[~first]),
            ("the corrected digits themselves", images[wrong], labels[wrong]),
        ]
        if args.source == "nsysu":
            cvl_x, cvl_y, _ = load_cvl("valid")
            cvl_images, cvl_index = segment_crops(cvl_x)
            rows.insert(1, ("CVL validation writers (all)", cvl_images, cvl_y[cvl_index]))
        for name, imgs, labs in rows:
            print(f"{name:52s}{accuracy(before, imgs, labs):10.2%}{accuracy(after, imgs, labs):10.2%}")


if __name__ == "__main__":
    main()
