"""Free-written digit strings: a number written in one box with no cells (a check's amount).

Segmentation finds the ink (Sauvola's adaptive threshold, which copes with tinted and
patterned paper), removes printed guide lines and the box border, groups strokes into blobs
(joining the pieces of a broken digit), and tells separators (. , - /) from digits by size,
position and shape. A blob about as wide as a digit or wider may be touching digits: candidate
cuts are placed at the valleys of its ink profile and between them, every segmentation into 1
to 4 pieces is classified, and the one whose digits the classifier is most sure of wins
(`decide_string`). That needs a classifier that refuses wrong cuts: the string model
(models/digits.strings.keras, trained on this module's own pieces by
formreader.training.train.make_string_pieces).

`segment_string` is pure image processing and returns every candidate piece as a 28x28 image,
so that the classifier can score all of a page's pieces in one batch.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import cv2
import numpy as np

from formreader.reading.classify import NOT_A_DIGIT, DigitReading, reading_from_probabilities
from formreader.reading.segment import BOX_VIEW, hysteresis, normalize_digits, remove_frame

MAX_PIECES = 4
MAX_ALTERNATIVES = 200
# The product of the pieces' probabilities and the readings' shares is under-confident: on 300
# fields of generated checks (seed 777, not the held-out ones) fields at 0.3-0.5 were right 91%
# of the time, at 0.5-0.7 94%, at 0.7-0.85 all. Its square root is nearer the truth (held out,
# with the shipped string model: 94% right at 0.70-0.85, 99% at 0.85-0.95); the table is
# printed by benchmarks/evaluate_checks.py.
CONFIDENCE_POWER = 0.5
CUT_FROM_WIDTH = 0.8  # blobs at least this many digit widths wide are tried cut (a touching 21 is narrow)
FLAT_MARK = 0.55  # of a digit's height: a mark no taller, at either end of a number, closes it ('100.-')
# A free field's digit is shown to the struck-digit detector in a square this many times the
# writing's height (digit_views): a stroke across a digit runs past its ends, as across a box.
FREE_VIEW = 1.3


@dataclass
class Blob:
    """A group of strokes: one digit, several touching digits, or a separator."""

    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool
    kind: str = "digit"  # 'digit' (one or more) or 'separator'
    separator: str = ""  # the separator it is, or (kind 'digit') may be
    # Ways to read a digit blob: each a list of column ranges (in blob coordinates), the
    # indices of their 28x28 images in StringLayout.images, and a log-penalty for its cuts.
    alternatives: list[tuple[list[tuple[int, int]], list[int], float]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass
class StringLayout:
    blobs: list[Blob]  # left to right
    images: np.ndarray  # (M, 28, 28) float32: every candidate piece
    digit_height: float  # typical digit height, px
    digit_width: float = 0.0  # typical width of one digit, px
    ink: np.ndarray | None = None  # (H, W) bool: the field's ink, guide lines taken out (digit_views)


@dataclass
class StringReading:
    value: str  # digits only
    raw: str  # digits and separators as written, e.g. '1.234,56'
    confidence: float
    digits: list[DigitReading]
    cuts: list[int]  # x positions (crop pixels) where touching digits were split
    boxes: list[tuple[int, int, int, int]]  # x, y, w, h of every digit read, crop pixels
    unreadable: int = 0  # blobs that are not digits (scribbles, marks); each is a '?' in raw
    status: str = "ok"  # 'ok' or 'review', decided by formreader.reading.fields.read_free_field
    reasons: list[str] = field(default_factory=list)
    other: str = ""  # another reader's reading of the same ink, where it reads other digits


def string_ink(crop: np.ndarray, min_contrast: float = 25.0) -> np.ndarray:
    """Ink mask (H, W) bool of a grey crop (dark ink on light, possibly patterned, paper).

    A pixel is ink where Sauvola's local threshold says so and it is clearly darker than the
    local paper: strokes must reach half the depth of the darkest ink somewhere (hysteresis
    seeds) and grow only through pixels darker than the background pattern's own lines (the
    90th percentile of darkness once the strong ink is set aside: a light security pattern
    or paper texture sets it).
    """
    g = cv2.GaussianBlur(crop.astype(np.float32), (3, 3), 0.7)
    window = max(15, (min(crop.shape) // 2) | 1)
    sauvola = g < sauvola_threshold(g, window)
    paper = cv2.GaussianBlur(cv2.dilate(g, np.ones((9, 9), np.uint8)), (0, 0), 4)  # local paper level
    dark = paper - g
    depth = float(np.percentile(dark, 99.5))
    background = dark[dark < 0.5 * depth]  # what is left once the strong ink is set aside
    pattern = float(np.percentile(background, 90)) if background.size else 0.0
    grow = max(min_contrast, 1.3 * pattern, 0.3 * depth)
    seed = max(grow, 0.5 * depth)
    if depth < min_contrast:
        return np.zeros(crop.shape, bool)
    return sauvola & hysteresis(dark > grow, dark > seed)


def sauvola_threshold(grey: np.ndarray, window: int, k: float = 0.2) -> np.ndarray:
    """Sauvola's local threshold m (1 + k (s / r - 1)) of a float32 image (H, W) of grey levels,
    m and s the mean and standard deviation over a `window` x `window` square (odd; the image
    mirrored at its edges), and r = 1, as skimage.filters.threshold_sauvola computes it for a
    float image (the string model was trained on crops inked this way; tests/test_strings.py
    compares the two). Box filters, not an import of scikit-image's filters (0.25 s a worker)."""
    box = dict(ksize=(window, window), normalize=True, borderType=cv2.BORDER_REFLECT_101)
    grey = grey.astype(np.float64)
    mean = cv2.boxFilter(grey, -1, **box).astype(np.float32)
    square = cv2.boxFilter(grey * grey, -1, **box).astype(np.float32)
    deviation = np.sqrt(np.clip(square - mean * mean, 0, None))
    return mean * (1 + k * (deviation - 1))


def remove_guide_lines(mask: np.ndarray) -> np.ndarray:
    """Remove long horizontal and vertical lines (guide lines, box borders) from an ink mask.

    A stroke that crosses a line keeps its pixels on the line where it has ink just above and
    just below, so a digit written over a guide line is not cut in two.
    """
    h, w = mask.shape
    m = mask.astype(np.uint8)
    # A line runs further than any digit's bar: at least 0.3 of the field and, in a short box
    # (two or three digits) where that is no longer than the bar of a 4 or the top of a 5, a
    # digit height and more (1.2 times the box's height), yet never longer than the box's own
    # border (0.9 of its width).
    length = max(15, int(0.3 * w), int(min(1.2 * h, 0.9 * w)))
    horiz = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((1, length), np.uint8))
    vert = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((max(15, int(0.85 * h)), 1), np.uint8))
    horiz = cv2.dilate(horiz, np.ones((3, 1), np.uint8))
    vert = cv2.dilate(vert, np.ones((1, 3), np.uint8))
    cleaned = mask & ~(horiz | vert).astype(bool)
    # Restore crossings: line pixels with ink beyond the line on both sides.
    reach = 4
    above = np.zeros_like(mask)
    below = np.zeros_like(mask)
    above[reach:] = cleaned[:-reach]
    below[:-reach] = cleaned[reach:]
    restore = horiz.astype(bool) & above & below & mask
    return cleaned | restore


def _components(mask: np.ndarray) -> list[Blob]:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    blobs = []
    for i in range(1, n):
        x, y, w, h, _area = (int(v) for v in stats[i])
        blobs.append(Blob(x, y, x + w, y + h, labels[y : y + h, x : x + w] == i))
    return blobs


def _merge(a: Blob, b: Blob) -> Blob:
    x0, y0, x1, y1 = min(a.x0, b.x0), min(a.y0, b.y0), max(a.x1, b.x1), max(a.y1, b.y1)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for blob in (a, b):
        mask[blob.y0 - y0 : blob.y1 - y0, blob.x0 - x0 : blob.x1 - x0] |= blob.mask
    return Blob(x0, y0, x1, y1, mask)


def _overlap(a: Blob, b: Blob) -> float:
    """Horizontal overlap of two blobs, as a fraction of the narrower one."""
    inter = min(a.x1, b.x1) - max(a.x0, b.x0)
    return max(0, inter) / max(1, min(a.width, b.width))


def _typical_height(blobs: list[Blob]) -> float:
    """The typical digit height (px): the median of the blobs at least half as tall as the tallest."""
    tallest = max(b.height for b in blobs)
    return float(np.median([b.height for b in blobs if b.height >= 0.5 * tallest]))


def _digit_line(blobs: list[Blob], digit_height: float) -> tuple[list[Blob], tuple[float, float]]:
    """The blobs tall enough to be digits, and the (top, bottom) of their line (medians, px)."""
    tall = [b for b in blobs if b.height >= 0.6 * digit_height]
    return tall, (float(np.median([b.y0 for b in tall])), float(np.median([b.y1 for b in tall])))


def group_blobs(mask: np.ndarray) -> tuple[list[Blob], float]:
    """Blobs in reading order, broken digits joined; and the typical digit height (px)."""
    blobs = [b for b in _components(mask) if b.mask.sum() >= 4]
    if not blobs:
        return [], 0.0
    digit_height = _typical_height(blobs)
    blobs = [b for b in blobs if b.mask.sum() >= max(4, 0.004 * digit_height**2)]  # specks
    _, band = _digit_line(blobs, digit_height)
    # Join pieces stacked over each other (the top bar of a 5, a broken 4): they overlap in x.
    # A separator written close to a digit (the comma under a touching pair) is not joined.
    blobs.sort(key=lambda b: b.x0)
    merged = True
    while merged:
        merged = False
        for a, b in itertools.combinations(blobs, 2):
            small = a if a.height < b.height else b
            if classify_separator(small, digit_height, band) and _overlap(a, b) < 0.6:
                continue  # beside the digit, not under it: a separator
            stacked = _overlap(a, b) >= 0.3 and (min(a.height, b.height) < 0.7 * digit_height)
            close = min(abs(a.y1 - b.y0), abs(b.y1 - a.y0)) < 0.35 * digit_height or (a.y0 < b.y1 and b.y0 < a.y1)
            if stacked and close and max(a.y1, b.y1) - min(a.y0, b.y0) <= 1.6 * digit_height:
                blobs.remove(a)
                blobs.remove(b)
                blobs.append(_merge(a, b))
                blobs.sort(key=lambda b: b.x0)
                merged = True
                break
    return blobs, _typical_height(blobs)  # again, now that broken digits are whole


def classify_separator(blob: Blob, digit_height: float, band: tuple[float, float]) -> str:
    """'.', ',', '-', '/' if the blob is a separator, else ''. band: (top, bottom) of the digits."""
    h, w = blob.height, blob.width
    top, bottom = band
    # A point or comma starts in the lower half of the line of digits; a comma is taller than
    # wide and hangs below the line.
    low = blob.y0 > top + 0.45 * (bottom - top)
    if low and h < 0.65 * digit_height and w < 0.5 * digit_height:
        return "," if blob.y1 > bottom + 0.12 * digit_height or h > 1.5 * w else "."
    centre = (blob.y0 + blob.y1) / 2
    mid_line = top + 0.25 * (bottom - top) < centre < bottom - 0.2 * (bottom - top)
    if h < 0.3 * digit_height and 0.25 * digit_height <= w <= 1.2 * digit_height and mid_line:
        return "-"
    # A slash leans right (up to the right: negative angle in image coordinates), and more
    # than a slanted 1 does: at least 28 degrees from the vertical.
    if h >= 0.6 * digit_height and w >= 0.4 * h and -62 < _slant(blob) < -25:
        return "/"
    return ""


def _slant(blob: Blob) -> float:
    """Angle (degrees from the x axis, image coordinates) of a straight stroke's main axis; 0 if
    the blob is not one straight stroke (its ink spreads across the axis by more than 0.3 of
    its spread along it: a stroke of any thickness is straight, a 7's bar or a 2's curl is not)."""
    ys, xs = np.nonzero(blob.mask)
    if len(xs) <= 5:
        return 0.0
    cov = np.cov(np.vstack([xs, ys]))
    small, large = np.linalg.eigvalsh(cov)
    if small > 0.09 * large:
        return 0.0
    return 0.5 * math.degrees(math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))


def _cut_candidates(blob: Blob, digit_width: float) -> list[int]:
    """Columns (blob coordinates) where touching digits may be split.

    The valleys of the ink profile (where two digits usually meet) and, between them, a column
    every sixth of a digit's width: digits that overlap often meet where the profile has no
    valley. The classifier, taught to refuse wrong cuts, chooses among them.
    """
    profile = blob.mask.sum(axis=0).astype(np.float32)
    smooth = np.convolve(profile, np.ones(3) / 3, mode="same")
    margin = max(2, int(0.25 * digit_width))
    cols = list(range(margin, blob.width - margin))
    if not cols:
        return []
    valleys = [c for c in cols if smooth[c] <= smooth[c - 1] and smooth[c] <= smooth[min(c + 1, blob.width - 1)]]
    step = max(2, int(round(digit_width / 6)))
    grid = [c for c in cols[::step] if all(abs(c - v) > 1 for v in valleys)]
    return sorted(set(valleys) | set(grid))


def _cut_penalty(blob: Blob, cuts: tuple[int, ...], digit_width: float) -> float:
    """Log-penalty of cutting a blob at these cuts: each stroke cut beyond the first costs 0.5
    (touching digits meet in one stroke; a cut through one digit crosses two or more), and a
    piece narrower than a third of a digit costs 1.0 (unless it is a thin, tall 1)."""
    penalty = 0.0
    for c in cuts:
        column = blob.mask[:, c].astype(np.int8)
        runs = int(np.count_nonzero(np.diff(np.concatenate([[0], column, [0]])) == 1))
        penalty += 0.5 * max(0, runs - 1)
    edges = [0, *cuts, blob.width]
    for a, b in zip(edges[:-1], edges[1:]):
        inked = np.nonzero(blob.mask[:, a:b].any(axis=1))[0]
        tall_thin = len(inked) and (inked.max() - inked.min()) > 0.7 * blob.height
        if b - a < digit_width / 3 and not tall_thin:
            penalty += 1.0
    return penalty


def _piece_ink(blob: Blob, a: int, b: int) -> np.ndarray | None:
    """The ink of a blob's columns a..b (anti-aliased a little, as a scan's is), or None for a
    sliver too small to be a digit."""
    piece = blob.mask[:, a:b]
    if piece.sum() < 3:
        return None
    return cv2.GaussianBlur(piece.astype(np.float32), (3, 3), 0.6)


def without_frame(crop: np.ndarray, interior: tuple[int, int, int, int]) -> np.ndarray:
    """A free field's crop with its box's own border painted over with the paper: (H, W) uint8.

    interior: the box's inside (x, y, w, h) in crop pixels, as the template puts it. The border
    is found as a boxed cell's is (formreader.reading.segment.remove_frame: thick, ragged or broken runs
    along each side, and the debris that reaches nowhere into the box), so that neither reader
    takes pieces of it for a 1, a comma or a stray mark; strokes written across it stay.
    """
    ink = string_ink(crop)
    frame = ink & ~remove_frame(ink, interior)
    if not frame.any():
        return crop
    paper = np.percentile(crop, 90)
    out = crop.copy()
    out[cv2.dilate(frame.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~(ink & ~frame)] = paper
    return out


def field_image(
    crop: np.ndarray, fill: float = 0.3, margin: float = 0.3, edge: float = 0.12
) -> tuple[np.ndarray, tuple[int, int]]:
    """The image of a free field's crop that both readers read, and where its corner lies in
    the crop (x, y; negative where paper was added): (H', W') uint8, (x, y).

    Both readers take a field as about as tall as its digits (the string model scales the crop
    to 32 px high): a number written a sixth as tall as a loose crop came out a few pixels tall
    and was misread (numbers of MNIST test digits in crops four times their height: a third read
    right, 95% now). When the line of digits (`_digit_line`, guide lines and box borders left
    out) spans less than `fill` of the crop's height, the image is the writing with `margin` of
    a digit's height around it. At 0.3 no field of the benchmarks is cut (their writing fills
    30-100% of the box); at 0.45 a share of the generated checks' and forms' fields is cut too
    (docs/measurements.md: tried, not kept). And writing that touches the crop's edge (a crop cut tight
    around it, as ORAND's are) gets `edge` of a digit's height of paper around it: the readers
    were taught fields with some paper about them (such numbers of MNIST digits: 88% read right
    cut tight, 95% with 4-6 px of paper).
    """
    h, w = crop.shape
    blobs = [b for b in _components(remove_guide_lines(string_ink(crop))) if b.mask.sum() >= 4]
    if not blobs:
        return crop, (0, 0)
    digit_height = _typical_height(blobs)
    blobs = [b for b in blobs if b.mask.sum() >= max(4, 0.004 * digit_height**2)]  # specks
    tall, _ = _digit_line(blobs, digit_height)
    top, bottom = min(b.y0 for b in tall), max(b.y1 for b in tall)
    if bottom - top < fill * h:
        m = round(margin * digit_height)
        y0, y1 = max(0, top - m), min(h, bottom + m)
        x0, x1 = max(0, min(b.x0 for b in blobs) - m), min(w, max(b.x1 for b in blobs) + m)
        return crop[y0:y1, x0:x1], (x0, y0)
    x0, y0 = min(b.x0 for b in blobs), min(b.y0 for b in blobs)
    x1, y1 = max(b.x1 for b in blobs), max(b.y1 for b in blobs)
    if x0 > 0 and y0 > 0 and x1 < w and y1 < h:  # paper all round already
        return crop, (0, 0)
    pad = max(1, round(edge * digit_height))
    paper = int(np.percentile(crop, 90))
    return cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=paper), (-pad, -pad)


def segment_string(crop: np.ndarray) -> StringLayout:
    """Find the digits and separators of a free-written number in a grey crop (H, W) uint8."""
    mask = remove_guide_lines(string_ink(crop))
    blobs, digit_height = group_blobs(mask)
    images: list[np.ndarray] = []  # the candidate pieces' ink, normalised together at the end
    if not blobs:
        return StringLayout([], np.zeros((0, 28, 28), np.float32), 0.0, ink=mask)
    tall, band = _digit_line(blobs, digit_height)
    # One digit's width: from blobs shaped like one digit (not a thin 1, not a touching pair).
    singles = [b.width for b in tall if 0.4 * b.height <= b.width <= 0.95 * b.height]
    digit_width = float(np.median(singles)) if singles else 0.7 * digit_height
    kept = []
    for blob in blobs:
        sep = classify_separator(blob, digit_height, band)
        if sep:
            blob.kind, blob.separator = "separator", sep
            kept.append(blob)
            if sep == "/":  # a slash looks like a slanted 1: keep the digit reading too
                piece = _piece_ink(blob, 0, blob.width)
                if piece is not None:
                    blob.alternatives.append(([(0, blob.width)], [len(images)], 0.0))
                    images.append(piece)
            continue
        if blob.height < 0.45 * digit_height and blob.width < 0.45 * digit_height:
            continue  # a stray mark above or in the line of digits, too small to be a digit
        if blob.height >= 0.6 * digit_height and blob.width >= 0.3 * blob.height and -75 < _slant(blob) <= -62:
            blob.separator = "/"  # steeper than a slash is written, but one may be: decide_string weighs both
        expected = blob.width / max(digit_width, 1.0)
        cuts = _cut_candidates(blob, digit_width) if expected > CUT_FROM_WIDTH else []
        index: dict[tuple[int, int], int | None] = {}  # a piece shared by several segmentations is normalised once
        for k in range(1, MAX_PIECES + 1):
            if k > 1 and (k - 1 > len(cuts) or k > expected + 1.0):
                break
            for chosen in itertools.combinations(cuts, k - 1):
                edges = [0, *chosen, blob.width]
                ranges = list(zip(edges[:-1], edges[1:]))
                if k > 2 and min(b - a for a, b in ranges[1:-1]) < 0.3 * digit_width:
                    continue  # a sliver between two cuts is not a digit
                for r in ranges:
                    if r not in index:
                        piece = _piece_ink(blob, *r)
                        index[r] = None if piece is None else len(images)
                        if piece is not None:
                            images.append(piece)
                idx = [index[r] for r in ranges]
                if any(i is None for i in idx):
                    continue
                blob.alternatives.append((ranges, idx, _cut_penalty(blob, chosen, digit_width)))
                if len(blob.alternatives) >= MAX_ALTERNATIVES:
                    break
        kept.append(blob)
    return StringLayout(kept, normalize_digits(images), digit_height, digit_width, mask)


def digit_views(layout: StringLayout, columns: list[tuple[int, int]]) -> np.ndarray:
    """Each digit of a free field framed as a box frames a boxed one (segment.box_view), for the
    struck-digit detector: (N, BOX_VIEW, BOX_VIEW) float32, ink high, one a column (x0, x1: a
    digit's place in the layout's crop, StringReading.boxes). Each is a square FREE_VIEW times the
    writing's digit height, centred on the column and on the writing's line; the neighbours' ink
    in it stays, as the detector was taught (a stroke across a digit runs on into them)."""
    ink = layout.ink
    if ink is None or not columns or not ink.any():
        return np.zeros((0, BOX_VIEW, BOX_VIEW), np.float32)
    side = max(2, int(FREE_VIEW * (layout.digit_height or ink.shape[0])))
    rows = np.flatnonzero(ink.any(1))
    top = int(round((rows[0] + rows[-1]) / 2 - side / 2)) + side  # in the padded ink
    padded = np.pad(ink.astype(np.float32), side)
    views = []
    for x0, x1 in columns:
        left = int(round((x0 + x1) / 2 - side / 2)) + side
        window = padded[top : top + side, left : left + side]
        views.append(cv2.resize(window, (BOX_VIEW, BOX_VIEW), interpolation=cv2.INTER_AREA))
    return np.stack(views)


@dataclass
class _Option:
    """One way to read a blob: a separator, or digits (its best segmentation)."""

    raw: str
    digits: list[DigitReading] = field(default_factory=list)
    confidence: float = 1.0
    cuts: list[int] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def _digit_option(blob: Blob, probabilities: np.ndarray, digit_width: float) -> _Option:
    """The blob's best segmentation into digits. Its score: the log of the product of its pieces'
    digit probabilities, plus a prior that the number of pieces fits the blob's width, minus the
    cuts' penalty; its confidence: that product times the reading's share of all segmentations."""
    expected = blob.width / max(digit_width, 1.0)
    scores, readings = [], []
    for _, idx, penalty in blob.alternatives:
        p = probabilities[idx]
        digit_p = np.clip(p[:, :NOT_A_DIGIT].max(axis=1), 1e-9, 1)
        # Digits vary in width (a 1 is a third of a 0): the prior only leans, the pieces decide.
        prior = -0.5 * (len(idx) - max(expected, 1.0)) ** 2
        scores.append(float(np.log(digit_p).sum()) + prior - penalty)
        readings.append(tuple(k for k in p.argmax(axis=1) if k != NOT_A_DIGIT))  # the digits it gives
    scores_arr = np.array(scores)
    best = int(np.argmax(scores_arr))
    # Segmentations that give the same digits are one reading, not rivals (cuts a pixel apart,
    # or a speck beside the digit taken for a piece); each reading counts by its best one.
    by_reading: dict[tuple, float] = {}
    for r, score in zip(readings, scores_arr):
        by_reading[r] = max(by_reading.get(r, -np.inf), score)
    share = float(np.exp(by_reading[readings[best]] - np.logaddexp.reduce(list(by_reading.values()))))
    option = _Option("", confidence=share)
    ranges, idx, _ = blob.alternatives[best]
    for (a, b), i in zip(ranges, idx):
        p = probabilities[i]
        k = int(np.argmax(p))
        option.digits.append(reading_from_probabilities(p))
        option.raw += option.digits[-1].digit
        # A mark that is not a digit counts by the chance that it is the digit it looks most
        # like: a reading that may have lost a digit must not report the confidence of one that
        # has not ('3?' is not '3' at 0.99).
        option.confidence *= float(p[:NOT_A_DIGIT].max()) if k == NOT_A_DIGIT else float(p[k])
        if k != NOT_A_DIGIT:
            option.boxes.append((blob.x0 + a, blob.y0, b - a, blob.height))
    option.cuts = [blob.x0 + a for a, _ in ranges[1:]]
    return option


def decide_string(layout: StringLayout, probabilities: np.ndarray, separators: str = ".,-/", pattern: str = "") -> StringReading:
    """Choose each blob's reading and read the string. probabilities: (M, 11) for layout.images.

    A digit blob is read as its best segmentation (`_digit_option`). A slash and a slanted 1
    look alike, so a blob that may be either has both readings: by default a slash where one
    of the field's `separators` may stand (between digits), else a 1; a steep one is a 1. When
    the field has a `pattern` (a regular expression for the whole reading, with separators)
    that the default breaks, the fewest slashes and 1s are swapped to make it match.
    """
    digit_width = layout.digit_width or 0.7 * max(layout.digit_height, 1.0)
    kinds = [b.kind for b in layout.blobs]
    choices: list[list[_Option]] = []  # per blob read, the default reading first
    read: list[Blob] = []  # the blob of each of `choices`
    for n, blob in enumerate(layout.blobs):
        read += [blob] * (blob.kind == "separator" or bool(blob.alternatives))
        between = "digit" in kinds[:n] and "digit" in kinds[n + 1 :]
        digit = _digit_option(blob, probabilities, digit_width) if blob.alternatives else None
        slash = _Option(blob.separator) if blob.separator in separators else None
        if blob.kind == "separator" and not blob.alternatives:
            choices.append([_Option(blob.separator)])
        elif blob.kind == "separator":  # a slash: read as the slanted 1 where no slash may stand
            choices.append([o for o in ((slash, digit) if slash and between else (digit, slash)) if o])
        elif digit:  # a digit, or a steep stroke that may yet be a slash
            choices.append([o for o in (digit, slash if blob.separator else None) if o])
    chosen = [c[0] for c in choices]
    ambiguous = [i for i, c in enumerate(choices) if len(c) > 1]
    if pattern and not re.fullmatch(pattern, "".join(o.raw for o in chosen)) and len(ambiguous) <= 10:
        candidates = (  # fewest swaps first
            [c[1] if i in picked else c[0] for i, c in enumerate(choices)]
            for swaps in range(1, len(ambiguous) + 1)
            for picked in itertools.combinations(ambiguous, swaps)
        )
        chosen = next((c for c in candidates if re.fullmatch(pattern, "".join(o.raw for o in c))), chosen)
    # A flat mark before the first digit or after the last that is no digit is the dash or the
    # bars that close an amount ('100.-', '636='): not a mark the reading could not read. (A
    # small digit there, cents written high, is read as a digit and kept.)
    digits_at = [i for i, o in enumerate(chosen) if any(c.isdigit() for c in o.raw)]
    flat = [b.height < FLAT_MARK * layout.digit_height for b in read]
    chosen = [
        o for i, o in enumerate(chosen)
        if not (set(o.raw) == {"?"} and flat[i] and (not digits_at or i < digits_at[0] or i > digits_at[-1]))
    ]
    reading = StringReading("", "".join(o.raw for o in chosen), 1.0, [], [], [])
    for o in chosen:
        reading.digits += o.digits
        reading.cuts += o.cuts
        reading.boxes += o.boxes
        reading.confidence *= o.confidence
    reading.confidence **= CONFIDENCE_POWER
    reading.value = "".join(d.digit for d in reading.digits if d.digit != "?")
    reading.unreadable = sum(d.digit == "?" for d in reading.digits)
    return reading


def cut_support(layout: StringLayout, probabilities: np.ndarray, digits: str) -> float:
    """How far the cut reader supports reading `digits` (a string of digits, e.g. another
    reader's): the probability of its best way of reading exactly these digits from the blobs
    (each blob cut as one of its segmentations, or set aside as a mark that is not a digit;
    separators pass), over the probability of its own best reading. 1 when it reads the same
    digits itself, near 0 when no segmentation of the ink gives them.
    probabilities: (M, 11) for layout.images.
    """
    n = len(digits)
    target = np.array([int(c) for c in digits], np.int64)
    logp = np.log(np.clip(probabilities, 1e-12, 1.0)) if len(probabilities) else np.zeros((0, 11))
    surest = logp[:, :NOT_A_DIGIT].max(axis=1)  # each piece's likeliest digit
    best_total = 0.0  # the cut reader's own best, blob by blob
    f = np.full(n + 1, -np.inf)  # f[i]: best log-probability with the first i digits read
    f[0] = 0.0
    for blob in layout.blobs:
        g = f.copy() if blob.kind == "separator" else np.full(n + 1, -np.inf)
        own = 0.0 if blob.kind == "separator" else -np.inf
        singles = [idx[0] for _, idx, _ in blob.alternatives if len(idx) == 1]
        if blob.kind != "separator":  # set aside as not a digit, with that probability
            skip = logp[singles[0], NOT_A_DIGIT] if singles else np.log(1e-3)
            g = np.maximum(g, f + skip)
            own = max(own, skip)
        for _, idx, penalty in blob.alternatives:
            k = len(idx)
            own = max(own, float(surest[idx].sum()) - penalty)
            if k > n:
                continue
            # The k pieces read as digits i .. i + k - 1 of `digits`, for every i at once.
            m = logp[idx][:, target]
            reads = sum(m[j, j : n - k + 1 + j] for j in range(k))
            g[k:] = np.maximum(g[k:], f[: n - k + 1] + reads - penalty)
        f = g
        best_total += own
    if f[n] == -np.inf:
        return 0.0
    return float(np.exp(min(0.0, f[n] - best_total)))
