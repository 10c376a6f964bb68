"""Corrections that teach: what `formreader train --extra` makes of a clerk's corrections.

    python benchmarks/evaluate_corrections.py [--prepared .accel/splits.npz] [--epochs 1] [--source nsysu]

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
the fine-tune alone, to compare with.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepared", type=Path, help="the prepared training splits (.npz) of `train --prepared`")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--source", choices=["cvl", "nsysu"], default="cvl", help="whose writers correct and are measured")
    parser.add_argument(
        "--teach", choices=["misread", "all", "none"], default="misread",
        help="the first half's digits taught: those misread, or all (a clerk who checked every field confirms the rest), "
        "or none (the fine-tune alone, to compare with)",
    )
    args = parser.parse_args()
    before = DigitClassifier.load()
    x, y, writers = load_nsysu() if args.source == "nsysu" else load_cvl("valid")
    if args.source == "nsysu":
        writers = np.array([str(e)[:4] for e in writers])  # the term: its writers are not the other terms'
    images, index = segment_crops(x)
    labels, writers = y[index], writers[index]
    ids = np.unique(writers)
    first = np.isin(writers, np.random.default_rng(7).permutation(ids)[: len(ids) // 2])
    wrong = first & (before.probabilities(images).argmax(1) != labels)
    taught = {"all": first, "misread": wrong, "none": np.zeros_like(first)}[args.teach]
    mnist_x, mnist_y = load_mnist("test", download=False)
    mnist = mnist_x.astype(np.float32) / 255.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corrections"
        for k in np.flatnonzero(taught):
            (folder / str(labels[k])).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / str(labels[k]) / f"{k}.png"), np.round(images[k] * 255).astype(np.uint8))
        extra = str(folder) if taught.any() else None
        config = TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, initial=str(before.path), extra=extra)
        data = TrainingData.load(args.prepared) if args.prepared else None
        out = Path(tmp) / "tuned.keras"
        meta = train_model(out, config, data=data, log=lambda *a: None)
        after = DigitClassifier.load(out)
        who = "NSYSU terms" if args.source == "nsysu" else "CVL validation writers"
        print(f"{int(taught.sum())} digits taught ({int(wrong.sum())} corrected) from {len(ids) // 2} {who}; fine-tuned "
              f"{meta['epochs_run']} epoch(s) in {meta['training_seconds']:.0f} s on {meta['train_images']} images")
        print(f"{'':44s}{'before':>10s}{'after':>10s}")
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
            print(f"{name:44s}{accuracy(before, imgs, labs):10.2%}{accuracy(after, imgs, labs):10.2%}")


if __name__ == "__main__":
    main()
