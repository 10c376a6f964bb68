"""Free-written digit strings: a number written in one box with no cells (a check's amount).

Segmentation finds the ink (Sauvola's adaptive threshold, which copes with tinted and
patterned paper), removes printed guide lines and the box border, groups strokes into blobs
(joining the pieces of a broken digit), and tells separators (. , - /) from digits by size,
position and shape. A blob wider than one digit may be touching digits: candidate cuts are
placed at the valleys of its ink profile, every segmentation into 1 to 4 pieces is classified,
and the one whose digits the classifier is most sure of wins (`decide_string`).

`segment_string` is pure image processing and returns every candidate piece as a 28x28 image,
so that the classifier can score all of a page's pieces in one batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage.filters import threshold_sauvola

from formreader.classify import NOT_A_DIGIT, DigitReading
from formreader.segment import normalize_digit

MAX_PIECES = 4
MAX_ALTERNATIVES = 60


@dataclass
class Blob:
    """A group of strokes: one digit, several touching digits, or a separator."""

    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool
    kind: str = "digit"  # 'digit' (one or more) or 'separator'
    separator: str = ""
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


@dataclass
class StringReading:
    value: str  # digits only
    raw: str  # digits and separators as written, e.g. '1.234,56'
    confidence: float
    digits: list[DigitReading]
    cuts: list[int]  # x positions (crop pixels) where touching digits were split
    boxes: list[tuple[int, int, int, int]]  # x, y, w, h of every digit read, crop pixels
    unreadable: int = 0  # blobs that are not digits (scribbles, marks)


def string_ink(crop: np.ndarray, min_contrast: float = 25.0) -> np.ndarray:
    """Ink mask (H, W) bool of a grey crop (dark ink on light, possibly patterned, paper).

    A pixel is ink where Sauvola's local threshold says so and it is clearly darker than the
    local paper: strokes must reach half the depth of the darkest ink somewhere (hysteresis
    seeds) and grow only through pixels darker than the background pattern's own lines (the
    90th percentile of darkness once the strong ink is set aside: a light security pattern
    or paper texture sets it).
    """
    from skimage.filters import apply_hysteresis_threshold

    g = cv2.GaussianBlur(crop.astype(np.float32), (3, 3), 0.7)
    window = max(15, (min(crop.shape) // 2) | 1)
    sauvola = g < threshold_sauvola(g, window_size=window, k=0.2)
    paper = cv2.GaussianBlur(cv2.dilate(g, np.ones((9, 9), np.uint8)), (0, 0), 4)  # local paper level
    dark = paper - g
    depth = float(np.percentile(dark, 99.5))
    background = dark[dark < 0.5 * depth]  # what is left once the strong ink is set aside
    pattern = float(np.percentile(background, 90)) if background.size else 0.0
    grow = max(min_contrast, 1.3 * pattern, 0.3 * depth)
    seed = max(grow, 0.5 * depth)
    if depth < min_contrast:
        return np.zeros(crop.shape, bool)
    return sauvola & apply_hysteresis_threshold(dark, grow, seed)


def remove_guide_lines(mask: np.ndarray) -> np.ndarray:
    """Remove long horizontal and vertical lines (guide lines, box borders) from an ink mask.

    A stroke that crosses a line keeps its pixels on the line where it has ink just above and
    just below, so a digit written over a guide line is not cut in two.
    """
    h, w = mask.shape
    m = mask.astype(np.uint8)
    horiz = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((1, max(15, int(0.3 * w))), np.uint8))
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


def group_blobs(mask: np.ndarray) -> tuple[list[Blob], float]:
    """Blobs in reading order, broken digits joined; and the typical digit height (px)."""
    blobs = [b for b in _components(mask) if b.mask.sum() >= 4]
    if not blobs:
        return [], 0.0
    tallest = max(b.height for b in blobs)
    digit_height = float(np.median([b.height for b in blobs if b.height >= 0.5 * tallest]))
    blobs = [b for b in blobs if b.mask.sum() >= max(4, 0.004 * digit_height**2)]  # specks
    tall = [b for b in blobs if b.height >= 0.6 * digit_height]
    band = (float(np.median([b.y0 for b in tall])), float(np.median([b.y1 for b in tall])))
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
    # The typical height again, now that broken digits are whole.
    tallest = max(b.height for b in blobs)
    digit_height = float(np.median([b.height for b in blobs if b.height >= 0.5 * tallest]))
    return blobs, digit_height


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
    if h >= 0.6 * digit_height and w >= 0.4 * h:
        ys, xs = np.nonzero(blob.mask)
        if len(xs) > 5:
            cov = np.cov(np.vstack([xs, ys]))
            angle = 0.5 * math.degrees(math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))
            thin = blob.mask.sum() < 0.3 * h * w
            # A slash leans right (up to the right: negative angle in image coordinates), and
            # more than a slanted 1 does: at least 28 degrees from the vertical.
            if thin and -62 < angle < -25:
                return "/"
    return ""


def _cut_candidates(blob: Blob, digit_width: float) -> list[int]:
    """Columns (blob coordinates) where touching digits may be split: valleys of the ink profile."""
    profile = blob.mask.sum(axis=0).astype(np.float32)
    smooth = np.convolve(profile, np.ones(3) / 3, mode="same")
    margin = max(2, int(0.25 * digit_width))
    cols = list(range(margin, blob.width - margin))
    if not cols:
        return []
    valleys = [c for c in cols if smooth[c] <= smooth[c - 1] and smooth[c] <= smooth[min(c + 1, blob.width - 1)]]
    valleys.sort(key=lambda c: smooth[c])
    chosen: list[int] = []
    for c in valleys:
        if all(abs(c - d) >= 0.3 * digit_width for d in chosen):
            chosen.append(c)
        if len(chosen) >= 6:
            break
    return sorted(chosen)


def _cut_penalty(blob: Blob, cuts: tuple[int, ...], digit_width: float) -> float:
    """Log-penalty of cutting a blob at these columns: each stroke cut beyond the first costs
    0.5 (touching digits meet in one stroke; a cut through one digit crosses two or more), and
    a piece narrower than a third of a digit costs 1.0 (unless it is a thin, tall 1)."""
    penalty = 0.0
    for c in cuts:
        column = blob.mask[:, c].astype(np.int8)
        runs = int(np.count_nonzero(np.diff(np.concatenate([[0], column, [0]])) == 1))
        penalty += 0.5 * max(0, runs - 1)
    edges = [0, *cuts, blob.width]
    for a, b in zip(edges[:-1], edges[1:]):
        piece = blob.mask[:, a:b]
        rows = np.nonzero(piece.any(axis=1))[0]
        tall_thin = len(rows) and (rows.max() - rows.min()) > 0.7 * blob.height
        if b - a < digit_width / 3 and not tall_thin:
            penalty += 1.0
    return penalty


def _piece_image(blob: Blob, a: int, b: int) -> np.ndarray | None:
    piece = blob.mask[:, a:b]
    if piece.sum() < 3:
        return None
    ink = cv2.GaussianBlur(piece.astype(np.float32), (3, 3), 0.6)
    return normalize_digit(ink)


def segment_string(crop: np.ndarray) -> StringLayout:
    """Find the digits and separators of a free-written number in a grey crop (H, W) uint8."""
    mask = remove_guide_lines(string_ink(crop))
    blobs, digit_height = group_blobs(mask)
    images: list[np.ndarray] = []
    if not blobs:
        return StringLayout([], np.zeros((0, 28, 28), np.float32), 0.0)
    tall = [b for b in blobs if b.height >= 0.6 * digit_height]
    band = (float(np.median([b.y0 for b in tall])), float(np.median([b.y1 for b in tall])))
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
                piece = _piece_image(blob, 0, blob.width)
                if piece is not None:
                    blob.alternatives.append(([(0, blob.width)], [len(images)], 0.0))
                    images.append(piece)
            continue
        if blob.height < 0.45 * digit_height and blob.width < 0.45 * digit_height:
            continue  # a stray mark above or in the line of digits, too small to be a digit
        expected = blob.width / max(digit_width, 1.0)
        cuts = _cut_candidates(blob, digit_width) if expected > 1.4 else []
        for k in range(1, MAX_PIECES + 1):
            if k > 1 and (k - 1 > len(cuts) or k > expected + 1.0):
                break
            for chosen in itertools.combinations(cuts, k - 1):
                edges = [0, *chosen, blob.width]
                ranges = list(zip(edges[:-1], edges[1:]))
                pieces = [_piece_image(blob, a, b) for a, b in ranges]
                if any(p is None for p in pieces):
                    continue
                idx = list(range(len(images), len(images) + len(pieces)))
                images += pieces
                blob.alternatives.append((ranges, idx, _cut_penalty(blob, chosen, digit_width)))
                if len(blob.alternatives) >= MAX_ALTERNATIVES:
                    break
        kept.append(blob)
    stack = np.stack(images) if images else np.zeros((0, 28, 28), np.float32)
    return StringLayout(kept, stack, digit_height, digit_width)


def decide_string(layout: StringLayout, probabilities: np.ndarray, separators: str = ".,-/") -> StringReading:
    """Choose each blob's segmentation and read the string. probabilities: (M, 11) for layout.images.

    A segmentation's score is the log of the product of its pieces' digit probabilities plus a
    prior that the number of pieces matches the blob's width. `separators` are the ones the
    field allows: a "slash" where none is allowed is read as the slanted 1 it then is. Its confidence is that product
    times the segmentation's share of all the blob's segmentations' probability.
    """
    value, raw, digits, cuts, boxes = [], [], [], [], []
    confidence, unreadable = 1.0, 0
    digit_width = layout.digit_width or 0.7 * max(layout.digit_height, 1.0)
    kinds = [b.kind for b in layout.blobs]
    for n, blob in enumerate(layout.blobs):
        # A separator stands between digits: a "slash" before the first digit or after the
        # last one is a slanted 1.
        between = "digit" in kinds[:n] and "digit" in kinds[n + 1 :]
        allowed = between and blob.separator in separators
        if blob.kind == "separator" and (allowed or not blob.alternatives):
            raw.append(blob.separator)
            continue
        if not blob.alternatives:
            continue
        expected = blob.width / max(digit_width, 1.0)
        scores = []
        for _, idx, penalty in blob.alternatives:
            p = probabilities[idx]
            digit_p = np.clip(p[:, :NOT_A_DIGIT].max(axis=1), 1e-9, 1)
            prior = -0.5 * ((len(idx) - max(expected, 1.0)) / 0.6) ** 2
            scores.append(float(np.log(digit_p).sum()) + prior - penalty)
        scores_arr = np.array(scores)
        best = int(np.argmax(scores_arr))
        share = float(np.exp(scores_arr[best] - np.logaddexp.reduce(scores_arr)))
        ranges, idx, _ = blob.alternatives[best]
        for (a, b), i in zip(ranges, idx):
            p = probabilities[i]
            k = int(np.argmax(p))
            if k == NOT_A_DIGIT:
                unreadable += 1
                digits.append(DigitReading("?", float(p[k]), p))
                raw.append("?")
                continue
            digits.append(DigitReading(str(k), float(p[k]), p))
            value.append(str(k))
            raw.append(str(k))
            confidence *= float(p[k])
            boxes.append((blob.x0 + a, blob.y0, b - a, blob.height))
        cuts += [blob.x0 + a for a, _ in ranges[1:]]
        confidence *= share
    return StringReading("".join(value), "".join(raw), confidence, digits, cuts, boxes, unreadable)
