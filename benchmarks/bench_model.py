"""Digit classifier speed: formreader's model against the original student architecture.

    python benchmarks/bench_model.py [--seconds 3]

Both models are measured in the same run, on the same machine, through the same fast path
(TensorFlow's TFLite converter by formreader.reading.classify.TFLITE_RECIPE + the LiteRT
interpreter), at batch 1 and batch 256; the
original is also measured through Keras `model.predict`, as the student project ran it. The
original is built with random weights: its speed does not depend on them. Then `read_digits`
on the 10,000 MNIST test crops (dark ink on light paper, as a scan gives them: each segmented,
then classified, a chunk classified while the next is segmented), against the original via
`model.predict` at batch 256, in three rounds of one then the other (the machine's speed
drifts), each round's ratio and their median. Then the string model (free fields read whole,
every view by each of its networks): fields per second, the networks alone at batch 64, and
with the beam search that decodes each field. Also `read_digits` on crops of many sizes
(ORAND's test digits, each cut by its box), which are segmented a shape at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from formreader.reading.classify import DigitClassifier, convert_to_tflite  # noqa: E402
from formreader.training.model import build_original_cnn  # noqa: E402


def rate(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def read_digits_line(predict, seconds: float, rounds: int = 3) -> None:
    """read_digits on MNIST's test crops against the original via `predict` (batch 256), in
    `rounds` rounds each timing one and then the other, since this machine's speed drifts from
    one moment to the next: digits/s (segmentation included), accuracy, each round's ratio and
    their median."""
    import formreader
    from formreader.training.datasets import load_mnist

    try:
        images, labels = load_mnist("test")
    except FileNotFoundError as e:
        print(f"read_digits left out: {e}")
        return
    crops = [255 - im for im in images]
    formreader.read_digits(crops[:100])  # the interpreters made, the caches warm
    batch = np.random.default_rng(0).random((256, 28, 28), dtype=np.float32)
    speeds, ratios = [], []
    for _ in range(rounds):
        predict_rate = rate(predict, batch, seconds)
        start = time.perf_counter()
        readings = formreader.read_digits(crops)
        speeds.append(len(crops) / (time.perf_counter() - start))
        ratios.append(speeds[-1] / predict_rate)
    right = np.mean([r.digit == str(d) for r, d in zip(readings, labels)])
    each = ", ".join(f"{s:.0f}/s {r:.2f}x" for s, r in zip(speeds, ratios))
    print(f"read_digits on the {len(crops)} MNIST test crops: {np.median(speeds):.0f} digits/s, {right:.2%} right; "
          f"{np.median(ratios):.2f}x the original via model.predict (batch 256), the median of {rounds} rounds ({each})")


def read_digits_of_many_sizes() -> None:
    """read_digits on crops of many sizes, as a program that cuts digits from its own scans hands
    them over: ORAND's test digits, each cut by its box. Crops of one shape are segmented
    together (segment_cells); each other shape alone, at a cost that a stack shares."""
    import formreader
    from formreader.training.datasets import load_orand, orand_digit_crops

    try:
        crops, labels = orand_digit_crops(load_orand("test"))[:2]
    except FileNotFoundError as e:
        print(f"read_digits on crops of many sizes left out: {e}")
        return
    crops = list(crops)
    start = time.perf_counter()
    readings = formreader.read_digits(crops)
    speed = len(crops) / (time.perf_counter() - start)
    right = np.mean([r.digit == str(d) for r, d in zip(readings, labels)])
    shapes = len({np.shape(c) for c in crops})
    print(f"read_digits on ORAND's {len(crops)} test digits, cut by their boxes ({shapes} sizes): {speed:.0f} digits/s, "
          f"{right:.2%} right")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    ours = DigitClassifier.load()
    original_keras = build_original_cnn()
    original = DigitClassifier(convert_to_tflite(original_keras), 1.0, {}, "original", ours.threads)
    x = np.random.default_rng(0).random((256, 28, 28), dtype=np.float32)
    print(
        f"threads: {ours.threads}; parameters: formreader {ours.meta.get('parameters')}, original {original_keras.count_params()}"
    )
    results = {}
    for batch in (1, 256):
        xb = x[:batch]
        results[("ours", batch)] = rate(ours.logits, xb, args.seconds)
        results[("orig", batch)] = rate(original.logits, xb, args.seconds)
        results[("orig-predict", batch)] = rate(
            lambda b: original_keras.predict(b[..., None], batch_size=256, verbose=0), xb, args.seconds
        )
    print(f"{'batch':>5} {'formreader':>12} {'original':>12} {'ratio':>7} {'original via model.predict':>28}")
    for batch in (1, 256):
        o, r, p = results[("ours", batch)], results[("orig", batch)], results[("orig-predict", batch)]
        print(f"{batch:5d} {o:10.0f}/s {r:10.0f}/s {o / r:6.2f}x {p:26.0f}/s")
    read_digits_line(lambda b: original_keras.predict(b[..., None], batch_size=256, verbose=0), args.seconds)
    read_digits_of_many_sizes()
    reader = ours.string_model
    if reader is None:
        print("no string model beside the digit model")
        return
    from formreader.reading.string_model import VIEWS, decode_views, field_views
    from formreader.training.datasets import load_orand

    # A field is read in each of its views (string_model.VIEWS): (64, V, 32, 256).
    try:  # real fields where there are some; the model's speed does not depend on what it reads
        fields = np.stack([field_views(a.image) for a in load_orand("val")][:64])
    except FileNotFoundError:
        fields = np.random.default_rng(0).random((64, len(VIEWS), 32, 256), dtype=np.float32)

    # Every network of the string model (it and its companion, if it has one) reads every view.
    model_rate = rate(reader.view_probabilities, fields, args.seconds)
    decoded_rate = rate(lambda b: [decode_views(p) for p in reader.view_probabilities(b)], fields, args.seconds)
    networks = 1 + (reader.companion is not None)
    print(
        f"string model ({networks} networks of {reader.meta.get('parameters')} parameters), batch {len(fields)} fields "
        f"in {len(VIEWS)} views: {model_rate:.0f} fields/s alone, {decoded_rate:.0f} fields/s with beam-search decoding"
    )


if __name__ == "__main__":
    main()
