"""Training the digit CNN on MNIST, with augmentation shaped like real segmented boxes.

The augmentation is the other half of segmentation (formreader.reading.segment): segmentation makes a
scanned box look like MNIST, augmentation makes MNIST look like what segmentation really
produces (tilted, sheared, thin or thick strokes, slightly warped, a piece of box line at an
edge), and a "not a digit" class is taught from specks, blobs, box-line corners and scribbles
normalised exactly as a cell would be.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

from formreader.reading.classify import NOT_A_DIGIT, convert_when_trained
from formreader.reading.locate import CELL_MARGIN
from formreader.reading.segment import MNIST_SIZE, normalize_digit, segment_crops
from formreader.training.datasets import load_mnist
from formreader.training.synth import CELL, bitonal, ink_on_black, pen_or_pencil, write_digit


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 2e-3
    validation: int = 5000  # MNIST digits carved from the training split for early stopping
    negatives: int = 4000  # synthetic not-a-digit images
    patience: int = 10
    seed: int = 20261124
    limit: int | None = None  # use only this many images of each source (for quick runs and tests)
    strings: int = 0  # free-written numbers whose segmentation pieces are trained on (make_string_pieces)
    initial: str | None = None  # start from this model's weights (fine-tuning) instead of at random
    cvl: bool = True  # train on CVL's training writers too (European handwriting)
    cvl_val_writers: int = 10  # of them, this many writers are held out for validation
    orand: bool = True  # train on the ORAND-CAR-A digits of the 'train' checks (cut by their boxes)
    width: float = 2.0  # the CNN's channel multiplier (formreader.training.model.build_digit_cnn)
    depth: int = 1  # 2: the deeper network of build_digit_cnn (the companion)
    stretch: float = 0.0  # this share of each batch is stretched to fill the square (`augment_batch`)
    narrow: float = 0.0  # this share of each batch is squeezed to a narrow digit (`augment_batch`)
    # Add this share of the training digits again as a scanned form's box gives them
    # (`scanned_copies`): small, blurred and noisy, a quarter bitonal; a look clean crops lack.
    scanned: float = 0.0
    # Add this share of the real crops (CVL's and ORAND's writers, both splits) again as written
    # into a form's box at their own stroke width and scanned (`written_copies`), half bitonal:
    # the thin strokes that break and the thick ones that fill in a bitonal scan.
    written: float = 0.0
    # Fill this many scanned forms of each style (synth.FORM_STYLES) per source and split with the
    # split's own writers, written 0.6-1.2 of a box tall (inside it, and across its lines), and read
    # their cells as a page is read (`form_cells`): what the box's line takes from a digit that
    # touches or crosses it (the bar of a 7 on the top line) is then seen in training too.
    forms: int = 0
    # How often each source's images come per epoch, on average: the few thousand real digits
    # of other populations would otherwise be drowned by MNIST's fifty thousand.
    oversample: dict = field(default_factory=lambda: {"cvl": 3.0, "orand": 2.0, "corrections": 20.0})
    # A folder of labelled digits to learn too (LABEL/*.png): what people confirmed and corrected
    # at the review station (results.corrections/), trained with the base data so nothing is forgotten.
    extra: str | None = None
    # Stop after the last epoch that fits in this many seconds (a lent accelerator's call has ten minutes).
    time_limit: float | None = None

    @classmethod
    def from_card(cls, config: dict) -> TrainConfig:
        """The config a model card records (its "config"), less options this version no longer
        has: a card written before stop 23 records `bitonal`, which `scanned` replaced."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


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
    touching, and segmented by formreader.reading.strings exactly as a scanned check would be. Every
    candidate piece is labelled by whose ink it holds: a digit if it holds nearly all of one
    digit and little else, not-a-digit if it holds two digits or a fragment of one (a wrong
    cut), left out in between. This teaches the classifier to refuse wrong cuts, which it
    otherwise reads as confident digits (a touching 21 as a 4). Returns (N, 28, 28) float32
    and (N,) uint8.
    """
    from formreader.pipeline import free_field_crop
    from formreader.reading.strings import segment_string
    from formreader.training.synth import DigitSource, blank_check, random_check_values, write_number

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
# Augmentation (numpy, on whole batches: the same on any Keras backend, CPU or GPU)
# ---------------------------------------------------------------------------------------------


def augment_batch(images: np.ndarray, rng: np.random.Generator, stretch: float = 0.0, narrow: float = 0.0) -> np.ndarray:
    """Randomly distort a batch (B, 28, 28) float32 of ink-on-black digits; returns (B, 28, 28).

    A share `stretch` of the digits is first stretched to fill the 20x20 box whatever its aspect,
    as crops cut and scaled to a fixed size arrive (CVL's copy does this: a narrow 1 comes wide).
    A share `narrow` is squeezed to 0.45-0.8 of its width, as writers who write narrow digits
    make them: a 7 whose bar is a short hook, a 9 with a small loop (left as they are, such
    digits read as 1s).
    One bilinear resampling does an affine distortion (rotation +-12 deg, scale 0.85-1.15 per
    axis, shear +-0.3, shift +-2 px) plus a smooth elastic field (about 1 px); then strokes are
    thickened or thinned, ink contrast varies, and some images get a piece of box line at an edge.
    An eighth of the batch is left undistorted.
    """
    images = np.asarray(images, np.float32)
    b, size = len(images), images.shape[1]
    if stretch:
        images = images.copy()
        for i in np.flatnonzero(rng.random(b) < stretch):
            images[i] = stretch_to_square(images[i])
    c = (size - 1) / 2.0
    theta = np.deg2rad(rng.uniform(-12, 12, b))
    sx, sy = rng.uniform(0.85, 1.15, b), rng.uniform(0.85, 1.15, b)
    if narrow:  # (drawn only when asked for: the random stream of earlier recipes stays as it was)
        sx = np.where(rng.random(b) < narrow, rng.uniform(0.45, 0.8, b), sx)
    shear = rng.uniform(-0.3, 0.3, b)
    tx, ty = rng.uniform(-2, 2, b), rng.uniform(-2, 2, b)
    cos, sin = np.cos(theta), np.sin(theta)
    # Output pixel -> input pixel: in = A (out - c) + c + t.
    a00, a01 = cos / sx, (-sin + shear * cos) / sx
    a10, a11 = sin / sy, (cos + shear * sin) / sy
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32) - c
    col = lambda v: v[:, None, None]  # noqa: E731
    xs = col(a00) * gx + col(a01) * gy + c + col(tx)
    ys = col(a10) * gx + col(a11) * gy + c + col(ty)
    # Elastic: a 4x4 field of random displacements, smoothly upsampled.
    coarse = rng.normal(0, 0.9, (b, 4, 4, 2)).astype(np.float32)
    elastic = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in coarse])
    out = bilinear_sample(images, xs + elastic[..., 0], ys + elastic[..., 1])
    # Stroke thickness: thicken a fifth, thin a fifth (2x2 max / min filters).
    padded = np.pad(out, ((0, 0), (0, 1), (0, 1)))
    windows = np.stack([padded[:, :-1, :-1], padded[:, 1:, :-1], padded[:, :-1, 1:], padded[:, 1:, 1:]])
    r = col(rng.random(b))
    out = np.where(r < 0.2, windows.max(0), np.where(r > 0.8, np.maximum(windows.min(0), 0.5 * out), out))
    # Ink contrast and anti-aliasing vary with pen and scanner.
    out = np.power(np.clip(out, 0, 1) + 1e-6, col(rng.uniform(0.7, 1.4, b)))
    # A fragment of box line along one edge for one image in ten.
    for i in np.flatnonzero(rng.random(b) < 0.1):
        pos, start, length = int(rng.integers(0, 3)), int(rng.uniform(0, 14)), int(rng.uniform(6, 28))
        line = np.zeros((size, size), np.float32)
        line[pos, start : start + length] = rng.uniform(0.5, 1.0)
        out[i] = np.maximum(out[i], np.rot90(line, int(rng.integers(0, 4))))
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    # One image in eight stays as it was: clean digits keep batch-norm statistics honest.
    keep = rng.random(b) < 0.125
    out[keep] = images[keep]
    return out


def scanned_copies(images: np.ndarray, rng: np.random.Generator, bitonal_share: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Digits (N, 28, 28) float32, ink high, as a scanned form's box brings them to the
    classifier: written 16-64 px tall (a box at 150-300 DPI), in pen or pencil on paper of a
    random tone, blurred as the optics do (in proportion to the size) and with the sensor's
    noise; `bitonal_share` of them then cut at a fixed threshold as a bitonal scanner does
    (formreader.training.synth.bitonal), where thin strokes break and thick ones swell. Then
    segmented and normalised by formreader's own code. Returns (images (M, 28, 28), index (M,)
    of the ones kept: a digit the scan wiped out is dropped).

    A digit read from a small blurred scan is not the crop it was cut from: on the forms of
    benchmarks/evaluate_forms.py the cells of held-out writers read 1.3-2.6 points worse than
    the same writers' crops."""
    crops = []
    for image in images:
        bitonal_scan = rng.random() < bitonal_share
        height = rng.uniform(40, 64) if bitonal_scan else rng.uniform(16, 64)  # bitonal: 300 DPI
        size = max(8, round(MNIST_SIZE * height / 20))  # the digit fills 20 of the image's 28 px
        ink = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if size < MNIST_SIZE else cv2.INTER_LINEAR)
        paper = rng.uniform(222, 250)
        level = pen_or_pencil(rng)
        grey = optics_and_sensor(paper - (paper - level) * np.clip(ink, 0, 1), height / 24, rng)
        crops.append(bitonal(grey, rng) if bitonal_scan else grey)
    return segment_crops(crops)


def optics_and_sensor(grey: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A grey image (H, W) float as a scanner sees it: blurred by its optics (0.4-0.9 px at
    `scale` 1, in proportion beyond) and noised by its sensor (2-6 grey levels). -> (H, W) uint8."""
    grey = cv2.GaussianBlur(grey, (0, 0), rng.uniform(0.4, 0.9) * scale)
    return np.clip(grey + rng.normal(0, rng.uniform(2, 6), grey.shape), 0, 255).astype(np.uint8)


def written_copies(
    crops, labels: np.ndarray, share: float, rng: np.random.Generator, bitonal_share: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """`share` of real digit crops (dark ink on light paper, any size) written again into a form's
    box as the form benchmarks write a writer's digits (synth.ink_on_black, synth.write_digit: the
    writer's own strokes, not the 28x28 image's, whose strokes are thickened to MNIST's width),
    scanned at 150-300 DPI (`bitonal_share` of them bitonal, at 300), brought back to the
    template's 150 DPI as the pipeline brings a page, and segmented. Returns (images (M, 28, 28),
    labels (M,)): a digit the scan wiped out is dropped.

    A bitonal scan breaks a thin stroke and fills a thick one in: stop 44, the cells of the
    model's 10 validation writers on the bitonal thick-bordered form read 91% right against 98%
    on grey scans; scanned_copies' bitonal copies, made from the thickened images, do not look so
    (the model read those of the same writers 85% right, these 93%)."""
    chosen = rng.choice(len(crops), int(round(share * len(crops))), replace=False)
    glyphs, labels = ink_on_black([crops[k] for k in chosen], np.asarray(labels)[chosen])
    scans = []
    for glyph in glyphs:
        bitonal_scan = rng.random() < bitonal_share
        factor = 2.0 if bitonal_scan else float(rng.choice([1.0, 4 / 3, 2.0]))
        side, margin = round(CELL * factor), round(CELL_MARGIN * CELL * factor)  # as a cell is cropped
        page = np.full((side + 2 * margin,) * 2, 255, np.uint8)
        write_digit(page, (margin, margin, side, side), glyph, rng, pen_or_pencil(rng))
        grey = optics_and_sensor(page.astype(np.float32) * (rng.uniform(222, 250) / 255), factor, rng)
        if bitonal_scan:
            grey = bitonal(grey, rng)
        size = round(grey.shape[0] / factor)
        scans.append(cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA) if factor != 1 else grey)
    images, kept = segment_crops(scans)
    return images, labels[kept]


# How tall the digits of `form_cells`' forms are written, as a share of the box: from the
# benchmarks' writing inside the box (synth.WRITING_SIZE) to theirs across its lines (LARGE_WRITING).
FORM_WRITING = (0.6, 1.2)


def registered_pages(template, items):
    """Each (page, anything) of `items` segmented as `template`'s form (pipeline.segment_page), with
    what came with it: (SegmentedPage, anything); a page that does not register is left out."""
    from formreader.pipeline import segment_page
    from formreader.reading.register import RegistrationError, prepare_reference

    features = prepare_reference(template.reference)
    for page, extra in items:
        try:
            yield segment_page(page, template, features), extra
        except RegistrationError:
            continue


def form_cells(images, labels: np.ndarray, pages: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits written into scanned forms and read back as the pipeline reads a page: `pages`
    forms of each style of synth.FORM_STYLES filled with `images` (MNIST's (N, 28, 28) uint8 or
    synth.ink_on_black's glyphs) and `labels`, FORM_WRITING of their boxes tall, registered,
    located and segmented (pipeline.segment_page). Returns (images (M, 28, 28), labels (M,)): the
    cells of each field whose non-blank cells are as many as the digits written, in order.

    A digit that touches or crosses its box's line loses what lies on the line (the bar of a 7 on
    the top line leaves a 1): in training it keeps its label, so that such a cell is read by its
    remaining strokes or with the doubt it deserves, not as a confident 1."""
    from formreader.training.synth import FORM_STYLES, scanned_forms

    if len(np.unique(labels)) < 10:  # a form's numbers need every digit (a --limit'ed run may lack one)
        return np.zeros((0, MNIST_SIZE, MNIST_SIZE), np.float32), np.zeros(0, np.uint8)
    out_images, out_labels = [], []
    for k, style in enumerate(FORM_STYLES):
        template, items = scanned_forms(style, images, labels, pages, seed + k, size=FORM_WRITING)
        for seg, truth in registered_pages(template, items):
            for spec, cells in zip(template.fields, seg.segments):
                found = [c.image for c in cells if c.image is not None]
                written = truth[spec.name]
                if found and len(found) == len(written):
                    out_images += found
                    out_labels += [int(d) for d in written]
    return np.array(out_images, np.float32).reshape(-1, MNIST_SIZE, MNIST_SIZE), np.array(out_labels, np.uint8)


def stretch_to_square(image: np.ndarray) -> np.ndarray:
    """A (28, 28) digit stretched to fill the 20x20 box, then placed the MNIST way (normalize_digit)."""
    ys, xs = np.nonzero(image > 0.05)
    if len(ys) == 0:
        return image
    square = cv2.resize(image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], (20, 20), interpolation=cv2.INTER_AREA)
    return normalize_digit(square, thicken=False, sharpen=False)


def bilinear_sample(images: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample (B, H, W) images at float coordinates xs, ys (B, H, W); zero outside."""
    b, h, w = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1))).reshape(b, -1)
    xs, ys = xs + 1.0, ys + 1.0
    x0, y0 = np.floor(xs), np.floor(ys)
    wx, wy = xs - x0, ys - y0
    out = np.zeros(xs.shape, np.float32)
    for dy, dx, weight in ((0, 0, (1 - wx) * (1 - wy)), (0, 1, wx * (1 - wy)), (1, 0, (1 - wx) * wy), (1, 1, wx * wy)):
        xx, yy = x0 + dx, y0 + dy
        inside = (xx >= 0) & (xx <= w + 1) & (yy >= 0) & (yy <= h + 1)
        flat = (np.clip(yy, 0, h + 1) * (w + 2) + np.clip(xx, 0, w + 1)).astype(np.int64).reshape(b, -1)
        out += np.where(inside, np.take_along_axis(padded, flat, 1).reshape(xs.shape), 0.0) * weight
    return out


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
# Training data: several populations of writers, split by writer and by check
# ---------------------------------------------------------------------------------------------

SOURCES = ("mnist", "cvl", "orand", "not_a_digit", "string_pieces", "corrections")


@dataclass
class TrainingData:
    """Images (N, 28, 28) float32 as the classifier sees them, labels (N,), and the source of each
    (an index into SOURCES), for the training and the validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    source_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    source_val: np.ndarray
    held_out: dict  # what validation holds back: how many MNIST digits, which CVL writers and ORAND checks

    def save(self, path: Path) -> None:
        # Images as 8-bit grey levels (MNIST's own precision): a quarter of the size.
        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        for k in ("x_train", "x_val"):
            arrays[k] = np.round(arrays[k] * 255).astype(np.uint8)
        np.savez_compressed(path, **arrays, held_out=json.dumps(self.held_out))

    @classmethod
    def load(cls, path: Path) -> TrainingData:
        with np.load(path) as d:
            arrays = {k: d[k] for k in d.files if k != "held_out"}
            for k in ("x_train", "x_val"):
                arrays[k] = arrays[k].astype(np.float32) / 255.0
            return cls(**arrays, held_out=json.loads(str(d["held_out"])))


def segmented(crops, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real crops (dark ink on light paper) through formreader's own cell segmentation, as
    read_digits and a form's cells see them: (images (M, 28, 28), labels (M,)), the crops
    judged blank left out."""
    images, index = segment_crops(crops)
    return images, labels[index]


def labelled_digits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The digits of a labelled folder (LABEL/NAME.png, LABEL one of 0-9): (N, 28, 28) float32
    and (N,) labels. 28x28 images are taken as the model's input (ink high, as the review station
    saves them); crops of other sizes (dark ink on light paper) go through the segmentation.
    Raises ValueError when the folder holds no such digit."""
    from PIL import Image

    images, labels, crops, crop_labels = [], [], [], []
    for path in sorted(Path(folder).glob("[0-9]/*.png")):
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L"))
        if grey.shape == (28, 28):
            images.append(grey.astype(np.float32) / 255.0)
            labels.append(int(path.parent.name))
        else:
            crops.append(grey)
            crop_labels.append(int(path.parent.name))
    if crops:
        x, y = segmented(crops, np.array(crop_labels))
        images += list(x)
        labels += list(y)
    if not images:
        raise ValueError(f"{folder}: no labelled digits (expected DIGIT/NAME.png, DIGIT one of 0-9)")
    return np.stack(images).astype(np.float32), np.array(labels, np.uint8)


def mnist_split(count: int, config: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST training split's indices for (validation, training): a permutation drawn from
    `rng` (its first draw, so that the split can be made again from the seed alone), cut to
    `config.limit`, `config.validation` of it (a fifth at most) for validation."""
    order = rng.permutation(count)
    if config.limit:
        order = order[: config.limit]
    n_val = min(config.validation, len(order) // 5)
    return order[:n_val], order[n_val:]


def cvl_writer_split(writers: np.ndarray, held_out: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask (N,) of the digits whose writer is one of `held_out` writers drawn at random:
    every digit of a writer falls on the same side."""
    chosen = rng.choice(np.unique(writers), size=held_out, replace=False)
    return np.isin(writers, chosen)


def build_training_data(config: TrainConfig, data_dir: Path | None = None, log=print) -> TrainingData:
    """Assemble the training and validation splits from every source of the config.

    - MNIST training split: `config.validation` digits held out at random; half of the rest
      passed through formreader's normalisation after a random resize (see `renormalize`).
    - CVL training writers (`config.cvl`): `config.cvl_val_writers` writers held out whole;
      crops through formreader's segmentation. The CVL validation writers are never used here.
    - ORAND-CAR-A digits (`config.orand`) cut by their boxes, of the checks of the 'train' split
      (the 'val' checks validate; the 'test' checks are never used here; `orand_split`).
    - Synthetic not-a-digit images; optionally the pieces of generated free-written numbers.
    - Optionally (`config.written`) CVL's and ORAND's crops again, written into a box and scanned
      (`written_copies`), each on its own split's side.
    """
    from formreader.training.datasets import ORAND_MARGIN, load_cvl, load_orand, orand_digit_crops

    root = Path(data_dir) if data_dir else None
    rng = np.random.default_rng(config.seed)
    written_rng = np.random.default_rng([config.seed, 11])  # its own: the other sources draw as without it
    parts: dict[str, list] = {"train": [], "val": []}  # (x, y, source name)

    def add_form_cells(split: str, images, labels: np.ndarray, source: str) -> None:
        # Validation gets a quarter as many forms; each source and split its own seed.
        pages = config.forms if split == "train" else max(1, config.forms // 4)
        seed = config.seed + 100 * SOURCES.index(source) + (50 if split == "val" else 0)
        parts[split].append((*form_cells(images, labels, pages, seed), source))

    images, labels = load_mnist("train", root / "mnist" if root else None)
    val_idx, train_idx = mnist_split(len(images), config, rng)
    for split, idx in (("val", val_idx), ("train", train_idx)):
        # Half the digits as MNIST drew them, half through formreader's normalisation, so
        # the rendering says nothing about the class.
        digits = images[idx].astype(np.float32) / 255.0
        half = rng.random(len(idx)) < 0.5
        digits[half] = renormalize(images[idx][half], rng)
        parts[split].append((digits, labels[idx], "mnist"))
        if config.forms:
            add_form_cells(split, images[idx], labels[idx], "mnist")
    held_out: dict = {"mnist_validation_digits": len(val_idx)}

    if config.cvl:
        x, y, writers = load_cvl("train", root / "cvl_digits" / "cvl_train.npz" if root else None)
        if config.limit:
            x, y, writers = x[: config.limit], y[: config.limit], writers[: config.limit]
        # Its own generator: which writers are held out does not change with the other sources.
        writer_rng = np.random.default_rng([config.seed, 1])
        val = cvl_writer_split(writers, min(config.cvl_val_writers, len(np.unique(writers)) // 3), writer_rng)
        for split, mask in (("val", val), ("train", ~val)):
            parts[split].append((*segmented(x[mask], y[mask]), "cvl"))
            if config.written:
                parts[split].append((*written_copies(x[mask], y[mask], config.written, written_rng), "cvl"))
            if config.forms:
                add_form_cells(split, *ink_on_black(x[mask], y[mask]), "cvl")
        held_out["cvl_validation_writers"] = sorted(int(w) for w in np.unique(writers[val]))
    if config.orand:
        folder = root / "orand_car_a" if root else None
        for split in ("val", "train"):
            amounts = load_orand(split, folder)
            if config.limit:
                amounts = amounts[: max(5, config.limit // 20)]
            # Validation cuts each box with the margin read_digits' figures use; training takes
            # the tight box too, two views of each digit.
            margins = (ORAND_MARGIN,) if split == "val" else (ORAND_MARGIN, 0)
            cuts = {margin: orand_digit_crops(amounts, margin) for margin in margins}
            for crops, lab, _ in cuts.values():
                parts[split].append((*segmented(crops, lab), "orand"))
            crops, lab, _ = cuts[ORAND_MARGIN]  # the cut read_digits' figures use
            if config.written:
                parts[split].append((*written_copies(crops, lab, config.written, written_rng), "orand"))
            if config.forms:
                add_form_cells(split, *ink_on_black(crops, lab), "orand")
            if split == "val":
                held_out["orand_validation_checks"] = [a.name for a in amounts]

    n_neg = config.negatives if not config.limit else max(10, config.limit // 10)
    negatives = make_non_digits(n_neg, rng)
    n_neg_val = max(1, n_neg // 10)
    parts["val"].append((negatives[:n_neg_val], np.full(n_neg_val, NOT_A_DIGIT, np.uint8), "not_a_digit"))
    parts["train"].append((negatives[n_neg_val:], np.full(n_neg - n_neg_val, NOT_A_DIGIT, np.uint8), "not_a_digit"))

    if config.strings:
        # Pieces of free-written numbers, from the split's own MNIST digits (validation pieces
        # from validation digits); wrong cuts thinned to as many as right ones, so that they do
        # not outweigh the digits.
        for split, idx, n in (("train", train_idx, config.strings), ("val", val_idx, max(1, config.strings // 10))):
            px, py = make_string_pieces(n, rng, images[idx], labels[idx])
            wrong = py == NOT_A_DIGIT
            keep = ~wrong | (rng.random(len(py)) < (~wrong).sum() / max(1, wrong.sum()))
            parts[split].append((px[keep], py[keep], "string_pieces"))

    def stack(split):
        xs, ys, ss = zip(*parts[split])
        source = np.concatenate([np.full(len(y), SOURCES.index(s), np.uint8) for y, s in zip(ys, ss)])
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32), source

    data = TrainingData(*stack("train"), *stack("val"), held_out)
    for split, src in (("training", data.source_train), ("validation", data.source_val)):
        counts = ", ".join(f"{SOURCES[s]} {int((src == s).sum())}" for s in np.unique(src))
        log(f"{split}: {len(src)} images ({counts})")
    return data


def with_extra_digits(data: TrainingData, folder: Path) -> TrainingData:
    """The training split with a labelled folder's digits added (`labelled_digits`), as the
    source 'corrections'; validation is left as it is (it guards against forgetting)."""
    x, y = labelled_digits(Path(folder))
    source = np.full(len(y), SOURCES.index("corrections"), np.uint8)
    held_out = {**data.held_out, "extra": {"folder": str(folder), "digits": int(len(y))}}
    return TrainingData(
        np.concatenate([data.x_train, x]), np.concatenate([data.y_train, y.astype(data.y_train.dtype)]),
        np.concatenate([data.source_train, source]), data.x_val, data.y_val, data.source_val, held_out,
    )


def with_scanned_copies(data: TrainingData, share: float, rng: np.random.Generator) -> TrainingData:
    """Both splits with `share` of their digits (of every source, not-a-digit aside) added again
    as a scanned form gives them (`scanned_copies`), labelled with their source: validation's
    copies let early stopping and the temperature weigh how scanned cells read, not clean crops alone."""

    def add(x: np.ndarray, y: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        digits = np.flatnonzero(y < NOT_A_DIGIT)
        chosen = rng.choice(digits, int(share * len(digits)), replace=False)
        images, kept = scanned_copies(x[chosen], rng)
        picked = chosen[kept]
        return np.concatenate([x, images]), np.concatenate([y, y[picked]]), np.concatenate([source, source[picked]])

    train = add(data.x_train, data.y_train, data.source_train)
    return TrainingData(*train, *add(data.x_val, data.y_val, data.source_val), data.held_out)


def epoch_order(source: np.ndarray, oversample: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Indices of one epoch, shuffled: each source's images repeated `oversample[name]` times on
    average (fractions by random draw), so that the few thousand digits of other populations of
    writers are not drowned by MNIST's fifty thousand."""
    idx = []
    for s in np.unique(source):
        members = np.flatnonzero(source == s)
        factor = oversample.get(SOURCES[s], 1.0)
        whole, frac = int(factor), factor - int(factor)
        idx += [members] * whole + [members[rng.random(len(members)) < frac]]
    order = np.concatenate(idx)
    return order[rng.permutation(len(order))]


def fit_balanced_temperature(logits: np.ndarray, labels: np.ndarray, source: np.ndarray) -> float:
    """The temperature fitted on validation data with each source weighted alike (by resampling
    every source to the size of the largest), so that MNIST's many easy digits do not set the
    confidence for writers of other populations."""
    largest = max(int((source == s).sum()) for s in np.unique(source))
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(source == s), largest) for s in np.unique(source)])
    return fit_temperature(logits[idx], labels[idx])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _batches(x: np.ndarray, y: np.ndarray, source: np.ndarray, config: TrainConfig, workers: int):
    """A Keras PyDataset of augmented, source-balanced training batches (any backend)."""
    import keras

    class AugmentedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False)
            self.epoch = 0
            self.on_epoch_end()

        def on_epoch_end(self):
            self.epoch += 1
            self.order = epoch_order(source, config.oversample, np.random.default_rng([config.seed, self.epoch]))

        def __len__(self):
            return math.ceil(len(self.order) / config.batch_size)

        def __getitem__(self, i):
            idx = self.order[i * config.batch_size : (i + 1) * config.batch_size]
            rng = np.random.default_rng([config.seed, self.epoch, i])
            return augment_batch(x[idx], rng, config.stretch, config.narrow)[..., None], y[idx]

    return AugmentedBatches()


def train_model(
    out: Path, config: TrainConfig, data_dir: Path | None = None, log=print, data: TrainingData | None = None
) -> dict:
    """Train the digit CNN and write `out` (.keras) with its card data beside it (.json).

    `data_dir`: the folder holding mnist/, cvl_digits/ and orand_car_a/ (default: see
    formreader.training.datasets.default_data_dir); `data`: prepared splits (`build_training_data`),
    which then need not be built again. Runs on whatever Keras backend is configured (a GPU
    with JAX or TensorFlow when one is there). Returns the metadata written.
    """
    import keras

    from formreader.training.model import build_digit_cnn

    keras.utils.set_random_seed(config.seed)
    data = data or build_training_data(config, data_dir, log)
    if config.extra:
        data = with_extra_digits(data, Path(config.extra))
        log(f"added {data.held_out['extra']['digits']} labelled digits of {config.extra}")
    if config.scanned:
        data = with_scanned_copies(data, config.scanned, np.random.default_rng([config.seed, 7]))
        log(f"added {int((data.y_train < NOT_A_DIGIT).sum())} digits in all, scanned copies included")
    n_not = int((data.y_train == NOT_A_DIGIT).sum())
    log(f"training on {len(data.x_train)} images ({n_not} not-a-digit), validating on {len(data.x_val)}")

    if config.initial:
        model = keras.models.load_model(config.initial, compile=False, safe_mode=True)
        # Fine-tuning keeps the batch-normalisation statistics of the full training: re-estimated
        # on a few thousand images (and a few hundred corrections) they would shift every digit.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    else:
        model = build_digit_cnn(width=config.width, depth=config.depth)
    train_batches = _batches(data.x_train, data.y_train, data.source_train, config, workers=min(8, os.cpu_count() or 1))
    val = (data.x_val[..., None], data.y_val)
    steps = config.epochs * len(train_batches)
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps, alpha=0.01)
    # An exponential moving average of the weights (used for validation, early stopping and
    # the saved model) smooths the last epochs' noise: better accuracy and calibration, no cost
    # at inference.
    model.compile(
        # (A short fine-tune averages over fewer steps: at 0.999 its average would barely move.)
        optimizer=keras.optimizers.Adam(schedule, use_ema=True, ema_momentum=min(0.999, 1 - 1 / max(10, steps / 20))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.SwapEMAWeights(swap_on_epoch=True),  # callbacks after it see the averaged weights
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
    ]
    limit = time_limit(config.time_limit, log)
    callbacks += limit
    start = time.time()
    history = model.fit(train_batches, validation_data=val, epochs=config.epochs, callbacks=callbacks, verbose=2)
    seconds = time.time() - start

    val_logits = np.asarray(model.predict(val[0], batch_size=512, verbose=0))
    temperature = fit_balanced_temperature(val_logits, data.y_val, data.source_val)
    per_source = {
        SOURCES[s]: float((val_logits[data.source_val == s].argmax(1) == data.y_val[data.source_val == s]).mean())
        for s in np.unique(data.source_val)
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.keras")
    # Saved without the optimizer's state (three quarters of the file): the shipped model only predicts.
    inference = keras.Model.from_config(model.get_config())
    inference.set_weights(model.get_weights())
    inference.save(tmp)
    tmp.replace(out)
    meta = {
        "temperature": temperature,
        "classes": [str(d) for d in range(10)] + ["not_a_digit"],
        "input": "28x28 float32, ink 1.0 on 0.0, MNIST-normalised (formreader.reading.segment.normalize_digit)",
        "parameters": int(model.count_params()),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "train_images": int(len(data.x_train)),
        "validation_images": int(len(data.x_val)),
        "validation_accuracy": float((val_logits.argmax(1) == data.y_val).mean()),
        "validation_accuracy_by_source": per_source,
        "validation_nll_before": nll(val_logits, data.y_val),
        "validation_nll_after": nll(val_logits, data.y_val, temperature),
        "held_out": data.held_out,
        "training_seconds": round(seconds, 1),
        "stopped_for_time": bool(limit and limit[0].stopped),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Keras {keras.__version__} on "
        f"{keras.backend.backend()} ({_accelerator()})",
        "config": dict(vars(config)),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    convert_when_trained(out, meta, log)  # the fast path's converted model, beside the .keras file
    log(f"saved {out}; temperature {temperature:.3f}; validation accuracy {meta['validation_accuracy']:.4%} {per_source}")
    return meta


def time_limit(seconds: float | None, log=print) -> list:
    """[a Keras callback that ends training after the last epoch that fits in `seconds` from its
    start, judged by the longest epoch so far (its `stopped` says whether it did)], or [] for None.
    The best weights are then kept as at any end (EarlyStopping's, or the best checkpoint)."""
    if seconds is None:
        return []
    import keras

    class TimeLimit(keras.callbacks.Callback):
        stopped = False

        def on_train_begin(self, logs=None):
            self.start = self.last = time.time()
            self.longest = 0.0

        def on_epoch_end(self, epoch, logs=None):
            now = time.time()
            self.longest, self.last = max(self.longest, now - self.last), now
            if now - self.start + self.longest > seconds and not self.model.stop_training:
                self.model.stop_training = self.stopped = True
                log(f"stopping after epoch {epoch + 1}: another would end past the time limit ({seconds:g} s)")

    return [TimeLimit()]


def _accelerator() -> str:
    import keras

    try:
        if keras.backend.backend() == "jax":
            import jax

            return str(jax.devices()[0].device_kind)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return f"{len(tf.config.list_physical_devices('GPU'))} GPU"
    except Exception:  # the record is informative only
        pass
    return "CPU"
