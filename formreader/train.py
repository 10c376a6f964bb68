"""Training the digit CNN on MNIST, with augmentation shaped like real segmented boxes.

The augmentation is the other half of segmentation (formreader.segment): segmentation makes a
scanned box look like MNIST, augmentation makes MNIST look like what segmentation really
produces (tilted, sheared, thin or thick strokes, slightly warped, a piece of box line at an
edge), and a "not a digit" class is taught from specks, blobs, box-line corners and scribbles
normalised exactly as a cell would be.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from formreader.classify import NOT_A_DIGIT, cached_tflite
from formreader.datasets import load_mnist
from formreader.segment import normalize_digit


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 2e-3
    validation: int = 5000  # images carved from the training split for early stopping
    negatives: int = 4000  # synthetic not-a-digit images
    patience: int = 10
    seed: int = 20261124
    limit: int | None = None  # use only this many training images (for quick runs and tests)
    strings: int = 0  # free-written numbers whose segmentation pieces are trained on (make_string_pieces)
    initial: str | None = None  # start from this model's weights (fine-tuning) instead of at random


# ---------------------------------------------------------------------------------------------
# Not-a-digit examples
# ---------------------------------------------------------------------------------------------


def renormalize(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pass MNIST digits (N, 28, 28) uint8 through the pipeline's own normalisation.

    Digits and not-a-digit examples must come out of the very same resampling and centring as
    a scanned cell does; otherwise the model learns to tell them apart by the look of the
    rendering instead of by shape. Each digit is first resized by a random factor (0.35x to 2x),
    as a digit written small or large and scanned would be, then normalised.
    """
    out = np.empty(images.shape, np.float32)
    for i, img in enumerate(images):
        size = int(round(28 * rng.uniform(0.35, 2.0)))
        interp = cv2.INTER_AREA if size < 28 else cv2.INTER_LINEAR
        scanned = cv2.resize(img.astype(np.float32) / 255.0, (size, size), interpolation=interp)
        out[i] = normalize_digit(scanned)
    return out


def make_non_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic not-a-digit images, (n, 28, 28) float32, normalised like a segmented cell.

    Kinds: blobs and specks, horizontal bars and box-line corners, clusters of dots, dense
    scribbles, noise blotches, cross-hatching. No vertical bar: that is a 1. Strokes are drawn
    at the width of an enlarged MNIST pen stroke, then blurred and normalised like the digits.
    """
    out = np.zeros((n, 28, 28), np.float32)
    for k in range(n):
        canvas = np.zeros((56, 56), np.uint8)
        kind = k % 6
        t = int(rng.integers(3, 7))
        if kind == 0:  # blob or speck
            axes = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
            cv2.ellipse(canvas, (28, 28), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        elif kind == 1:  # horizontal bar, or a corner of a box
            y = int(rng.integers(10, 46))
            x0, x1 = int(rng.integers(0, 20)), int(rng.integers(36, 56))
            dy = int(rng.integers(-3, 4))
            cv2.line(canvas, (x0, y), (x1, y + dy), 255, t)
            if rng.random() < 0.5:
                x = x0 if rng.random() < 0.5 else x1
                cv2.line(canvas, (x, y), (x, y + int(rng.choice([-1, 1]) * rng.integers(8, 30))), 255, t)
        elif kind == 2:  # dots
            for _ in range(int(rng.integers(2, 6))):
                c = (int(rng.integers(8, 48)), int(rng.integers(8, 48)))
                cv2.circle(canvas, c, int(rng.integers(2, 5)), 255, -1)
        elif kind == 3:  # dense scribble
            pts = rng.integers(6, 50, size=(int(rng.integers(10, 22)), 2)).astype(np.int32)
            cv2.polylines(canvas, [pts], False, 255, t)
        elif kind == 4:  # noise blotch
            noise = cv2.GaussianBlur(rng.random((56, 56)).astype(np.float32), (0, 0), 2.5)
            canvas = ((noise > np.quantile(noise, rng.uniform(0.8, 0.95))) * 255).astype(np.uint8)
        else:  # cross-hatching
            for _ in range(int(rng.integers(3, 6))):
                p = rng.integers(0, 56, size=4)
                cv2.line(canvas, (int(p[0]), 0), (int(p[1]), 55), 255, t)
                cv2.line(canvas, (0, int(p[2])), (55, int(p[3])), 255, t)
        ink = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (5, 5), 1.2)
        out[k] = normalize_digit(ink)
    return out


def make_string_pieces(n: int, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What string segmentation cuts out of `n` free-written numbers, labelled by their ink.

    Numbers are written from `images` (MNIST, ink 255 on 0) into a bank check's fields, often
    touching, and segmented by formreader.strings exactly as a scanned check would be. Every
    candidate piece is labelled by whose ink it holds: a digit if it holds nearly all of one
    digit and little else, not-a-digit if it holds two digits or a fragment of one (a wrong
    cut), left out in between. This teaches the classifier to refuse wrong cuts, which it
    otherwise reads as confident digits (a touching 21 as a 4). Returns (N, 28, 28) float32
    and (N,) uint8.
    """
    from formreader.pipeline import free_field_crop
    from formreader.strings import segment_string
    from formreader.synth import DigitSource, blank_check, random_check_values, write_number

    blank, fields = blank_check()
    source = DigitSource(images, labels, rng, reuse=True)
    pieces, classes = [], []
    for k in range(n):
        spec = fields[k % len(fields)]
        page = blank.copy()
        placed = write_number(page, spec.box, random_check_values(rng)[spec.name], source, rng, rng.uniform(15, 80), touching=0.5)
        crop, (x0, y0) = free_field_crop(page, spec.box)
        crop = crop.astype(np.float32) * (rng.uniform(222, 250) / 255)
        crop = cv2.GaussianBlur(crop, (0, 0), rng.uniform(0.4, 0.9)) + rng.normal(0, rng.uniform(2, 6), crop.shape)
        # Whose ink each pixel is: the digit stamped darkest there.
        owner = np.full(crop.shape, -1, np.int32)
        strongest = np.full(crop.shape, 0.25, np.float32)
        for j, (_, gx, gy, alpha) in enumerate(placed):
            ax, ay = gx - x0, gy - y0
            region = (slice(ay, ay + alpha.shape[0]), slice(ax, ax + alpha.shape[1]))
            a = alpha[: owner[region].shape[0], : owner[region].shape[1]]
            darker = a > strongest[region]
            owner[region][darker] = j
            strongest[region][darker] = a[darker]
        layout = segment_string(np.clip(crop, 0, 255).astype(np.uint8))
        found = np.zeros(len(placed) + 1, np.int64)  # segmented ink of each digit (last: nobody's)
        for blob in layout.blobs:
            np.add.at(found, owner[blob.y0 : blob.y1, blob.x0 : blob.x1][blob.mask], 1)
        seen = set()
        for b, blob in enumerate(layout.blobs):
            if blob.kind != "digit":
                continue
            blob_owner = owner[blob.y0 : blob.y1, blob.x0 : blob.x1]
            for ranges, idx, _ in blob.alternatives:
                for (a, e), i in zip(ranges, idx):
                    if (b, a, e) in seen:
                        continue
                    seen.add((b, a, e))
                    piece = blob.mask[:, a:e]
                    ink = blob_owner[:, a:e][piece]
                    counts = np.bincount(ink[ink >= 0], minlength=len(placed)).astype(np.float64)
                    share_of_digit = counts / np.maximum(found[: len(placed)], 1)
                    j = int(np.argmax(counts))
                    share_of_piece = counts[j] / max(len(ink), 1)
                    others = np.delete(share_of_digit, j).max(initial=0.0)
                    if share_of_piece >= 0.85 and share_of_digit[j] >= 0.85 and others < 0.15:
                        label = placed[j][0]
                    elif share_of_digit[j] < 0.6 or others >= 0.4:
                        label = NOT_A_DIGIT
                        ys, xs = np.nonzero(piece)
                        if len(xs) and np.ptp(xs) < 0.4 * np.ptp(ys):
                            continue  # a sliver is a 1 once normalised: the rest of its cut refuses it
                    else:
                        continue  # nearly right: neither a clean digit nor clearly wrong
                    pieces.append(layout.images[i])
                    classes.append(label)
    return np.array(pieces, np.float32).reshape(-1, 28, 28), np.array(classes, np.uint8)


# ---------------------------------------------------------------------------------------------
# Augmentation (TensorFlow, on whole batches)
# ---------------------------------------------------------------------------------------------


def augment_batch(images, training_seed: int = 0):
    """Randomly distort a batch (B, 28, 28, 1) float32 of ink-on-black digits.

    One bilinear resampling does an affine distortion (rotation +-12 deg, scale 0.85-1.15 per
    axis, shear +-0.3, shift +-2 px) plus a smooth elastic field (about 1 px); then strokes are
    thickened or thinned, ink contrast varies, and some images get a piece of box line at an edge.
    An eighth of the batch is left undistorted.
    """
    import tensorflow as tf

    b = tf.shape(images)[0]
    size = 28
    c = (size - 1) / 2.0
    u = lambda lo, hi: tf.random.uniform([b], lo, hi)  # noqa: E731
    theta = u(-12.0, 12.0) * (math.pi / 180)
    sx, sy = u(0.85, 1.15), u(0.85, 1.15)
    shear = u(-0.3, 0.3)
    tx, ty = u(-2.0, 2.0), u(-2.0, 2.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Output pixel -> input pixel: in = A (out - c) + c + t.
    a00, a01 = cos / sx, (-sin + shear * cos) / sx
    a10, a11 = sin / sy, (cos + shear * sin) / sy
    grid = tf.range(size, dtype=tf.float32) - c
    gy, gx = tf.meshgrid(grid, grid, indexing="ij")
    xs = a00[:, None, None] * gx + a01[:, None, None] * gy + c + tx[:, None, None]
    ys = a10[:, None, None] * gx + a11[:, None, None] * gy + c + ty[:, None, None]
    # Elastic: a 4x4 field of random displacements, smoothly upsampled.
    coarse = tf.random.normal(tf.stack([b, 4, 4, 2])) * 0.9
    field_ = tf.image.resize(coarse, (size, size), method="bicubic")
    xs += field_[..., 0]
    ys += field_[..., 1]
    out = _bilinear_sample(images[..., 0], xs, ys)[..., None]
    # Stroke thickness: thicken a fifth, thin a fifth.
    thick = tf.nn.max_pool2d(out, 2, 1, "SAME")
    thin = -tf.nn.max_pool2d(-out, 2, 1, "SAME")
    r = u(0.0, 1.0)[:, None, None, None]
    out = tf.where(r < 0.2, thick, tf.where(r > 0.8, tf.maximum(thin, 0.5 * out), out))
    # Ink contrast and anti-aliasing vary with pen and scanner.
    out = tf.pow(tf.clip_by_value(out, 0.0, 1.0) + 1e-6, u(0.7, 1.4)[:, None, None, None])
    # A fragment of box line along one edge for one image in ten.
    side = tf.random.uniform([b], 0, 4, dtype=tf.int32)
    pos = tf.cast(tf.random.uniform([b], 0, 3, dtype=tf.int32), tf.float32)
    start, length = u(0.0, 14.0), u(6.0, 28.0)
    idx = tf.range(size, dtype=tf.float32)
    along_x = (idx[None, None, :] >= start[:, None, None]) & (idx[None, None, :] < (start + length)[:, None, None])
    along_y = tf.transpose(along_x, [0, 2, 1])
    rows, cols = idx[None, :, None], idx[None, None, :]
    p = pos[:, None, None]
    s = side[:, None, None]
    line = (
        ((s == 0) & tf.equal(rows, p) & along_x)
        | ((s == 1) & tf.equal(rows, size - 1 - p) & along_x)
        | ((s == 2) & tf.equal(cols, p) & along_y)
        | ((s == 3) & tf.equal(cols, size - 1 - p) & along_y)
    )
    with_line = (u(0.0, 1.0) < 0.1)[:, None, None]
    line = tf.cast(line & with_line, tf.float32)[..., None] * u(0.5, 1.0)[:, None, None, None]
    out = tf.clip_by_value(tf.maximum(out, line), 0.0, 1.0)
    # One image in eight stays as it was: clean digits keep batch-norm statistics honest.
    return tf.where((u(0.0, 1.0) < 0.125)[:, None, None, None], images, out)


def _bilinear_sample(images, xs, ys):
    """Sample (B, H, W) images at float coordinates xs, ys (B, H, W); zero outside."""
    import tensorflow as tf

    h, w = tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1]])
    xs, ys = xs + 1.0, ys + 1.0
    x0, y0 = tf.floor(xs), tf.floor(ys)
    wx, wy = xs - x0, ys - y0
    maxx, maxy = tf.cast(w + 1, tf.float32), tf.cast(h + 1, tf.float32)
    bidx = tf.broadcast_to(tf.range(tf.shape(images)[0])[:, None, None], tf.shape(xs))

    def at(yy, xx):
        inside = (xx >= 0) & (xx <= maxx) & (yy >= 0) & (yy <= maxy)
        xi = tf.cast(tf.clip_by_value(xx, 0, maxx), tf.int32)
        yi = tf.cast(tf.clip_by_value(yy, 0, maxy), tf.int32)
        v = tf.gather_nd(padded, tf.stack([bidx, yi, xi], -1))
        return tf.where(inside, v, 0.0)

    return (
        at(y0, x0) * (1 - wx) * (1 - wy)
        + at(y0, x0 + 1) * wx * (1 - wy)
        + at(y0 + 1, x0) * (1 - wx) * wy
        + at(y0 + 1, x0 + 1) * wx * wy
    )


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on held-out data (golden section)."""
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    f = lambda t: nll(logits, labels, math.exp(t))  # noqa: E731
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return float(math.exp((lo + hi) / 2))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_model(out: Path, config: TrainConfig, data_dir: Path | None = None, log=print) -> dict:
    """Train the digit CNN and write `out` (.keras) with its card data beside it (.json).

    Returns the metadata written: temperature, validation figures, timing, machine.
    """
    import keras
    import tensorflow as tf

    from formreader.model import build_digit_cnn

    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    images, labels = load_mnist("train", data_dir)
    order = rng.permutation(len(images))
    if config.limit:
        order = order[: config.limit]
    n_val = min(config.validation, len(order) // 5)
    val_idx, train_idx = order[:n_val], order[n_val:]
    n_neg = config.negatives if not config.limit else max(10, len(order) // 10)
    negatives = make_non_digits(n_neg, rng)
    n_neg_val = max(1, n_neg // 10)

    def stack(idx, neg):
        # Half the digits as MNIST drew them, half through formreader's normalisation, so
        # the rendering says nothing about the class.
        digits = images[idx].astype(np.float32) / 255.0
        half = rng.random(len(idx)) < 0.5
        digits[half] = renormalize(images[idx][half], rng)
        x = np.concatenate([digits, neg])[..., None]
        y = np.concatenate([labels[idx], np.full(len(neg), NOT_A_DIGIT, np.uint8)]).astype(np.int32)
        return x, y

    x_train, y_train = stack(train_idx, negatives[n_neg_val:])
    x_val, y_val = stack(val_idx, negatives[:n_neg_val])
    if config.strings:
        # Pieces of free-written numbers, from the split's own digits (validation pieces from
        # validation digits); wrong cuts thinned to as many as right ones, so that they do not
        # outweigh the digits.
        parts = []
        for idx, n in ((train_idx, config.strings), (val_idx, max(1, config.strings // 10))):
            px, py = make_string_pieces(n, rng, images[idx], labels[idx])
            wrong = py == NOT_A_DIGIT
            keep = ~wrong | (rng.random(len(py)) < (~wrong).sum() / max(1, wrong.sum()))
            parts.append((px[keep][..., None], py[keep].astype(np.int32)))
        x_train, y_train = np.concatenate([x_train, parts[0][0]]), np.concatenate([y_train, parts[0][1]])
        x_val, y_val = np.concatenate([x_val, parts[1][0]]), np.concatenate([y_val, parts[1][1]])
        log(f"string pieces: {len(parts[0][1])} for training, {len(parts[1][1])} for validation")
    log(f"training on {len(x_train)} images ({int((y_train == NOT_A_DIGIT).sum())} not-a-digit), validating on {len(x_val)}")

    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .map(lambda x, y: (augment_batch(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(512)

    model = keras.models.load_model(config.initial, compile=False, safe_mode=True) if config.initial else build_digit_cnn()
    steps = config.epochs * math.ceil(len(x_train) / config.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps, alpha=0.01)
    # An exponential moving average of the weights (used for validation, early stopping and
    # the saved model) smooths the last epochs' noise: better accuracy and calibration, no cost
    # at inference.
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, use_ema=True, ema_momentum=0.999),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.SwapEMAWeights(swap_on_epoch=True),  # callbacks after it see the averaged weights
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
    ]
    start = time.time()
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks, verbose=2)
    seconds = time.time() - start

    val_logits = model.predict(x_val, batch_size=512, verbose=0)
    temperature = fit_temperature(val_logits, y_val)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.keras")
    model.save(tmp)
    tmp.replace(out)
    meta = {
        "temperature": temperature,
        "classes": [str(d) for d in range(10)] + ["not_a_digit"],
        "input": "28x28 float32, ink 1.0 on 0.0, MNIST-normalised (formreader.segment.normalize_digit)",
        "parameters": int(model.count_params()),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "train_images": int(len(x_train)),
        "validation_images": int(len(x_val)),
        "validation_accuracy": float((val_logits.argmax(1) == y_val).mean()),
        "validation_nll_before": nll(val_logits, y_val),
        "validation_nll_after": nll(val_logits, y_val, temperature),
        "training_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {len(tf.config.list_physical_devices('GPU'))} GPU, "
        f"{__import__('os').cpu_count()} CPU cores, TensorFlow {tf.__version__}",
        "config": dict(vars(config)),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    cached_tflite(out, meta)  # the fast path's converted model, beside the .keras file
    log(f"saved {out}; temperature {temperature:.3f}; validation accuracy {meta['validation_accuracy']:.4%}")
    return meta
