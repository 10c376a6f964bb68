"""Corrections that teach: what `formreader train --extra` makes of a clerk's corrections.

    python benchmarks/evaluate_corrections.py [--prepared .gpu/prepared.npz] [--epochs 1]

CVL's validation writers (never trained on) are split in two halves by writer. The digits of
the first half that the shipped model misreads are the "corrections" (labelled 28x28 crops, as
the review station saves them); the model is fine-tuned on them with its full training data
(`train --initial models/digits.keras --extra DIR`). Prints, before and after: MNIST test
accuracy (the whole 10,000), the second half's accuracy (writers neither model saw: does
what was taught carry over?), and how many of the corrections themselves are read right.
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
from formreader.training.datasets import load_cvl, load_mnist  # noqa: E402
from formreader.training.train import TrainConfig, TrainingData, train_model  # noqa: E402


def accuracy(clf: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((clf.probabilities(images).argmax(1) == labels).mean()) if len(labels) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepared", type=Path, help="the prepared training splits (.npz) of `train --prepared`")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    args = parser.parse_args()
    before = DigitClassifier.load()
    x, y, writers = load_cvl("valid")
    images, index = segment_crops(x)
    labels, writers = y[index], writers[index]
    ids = np.unique(writers)
    first = np.isin(writers, np.random.default_rng(7).permutation(ids)[: len(ids) // 2])
    wrong = first & (before.probabilities(images).argmax(1) != labels)
    mnist_x, mnist_y = load_mnist("test", download=False)
    mnist = mnist_x.astype(np.float32) / 255.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corrections"
        for k in np.flatnonzero(wrong):
            (folder / str(labels[k])).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / str(labels[k]) / f"{k}.png"), np.round(images[k] * 255).astype(np.uint8))
        config = TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, initial=str(before.path), extra=str(folder))
        data = TrainingData.load(args.prepared) if args.prepared else None
        out = Path(tmp) / "tuned.keras"
        meta = train_model(out, config, data=data, log=lambda *a: None)
        after = DigitClassifier.load(out)
        print(f"{int(wrong.sum())} corrections from {len(ids) // 2} CVL validation writers; fine-tuned "
              f"{meta['epochs_run']} epoch(s) in {meta['training_seconds']:.0f} s on {meta['train_images']} images")
        print(f"{'':40s}{'before':>10s}{'after':>10s}")
        for name, imgs, labs in (
            ("MNIST test (10,000)", mnist, mnist_y),
            (f"CVL writers not corrected ({int((~first).sum())} digits)", images[~first], labels[~first]),
            ("the corrected digits themselves", images[wrong], labels[wrong]),
        ):
            print(f"{name:40s}{accuracy(before, imgs, labs):10.2%}{accuracy(after, imgs, labs):10.2%}")


if __name__ == "__main__":
    main()
