"""Segmentation: from a grey cell crop (dark ink on light paper) to a 28x28 MNIST-style digit.

MNIST's own recipe is followed: the digit is fitted in a 20x20 box preserving its aspect ratio,
anti-aliased, and placed in a 28x28 field so that its centre of mass is at the centre. What
happens before that (thresholding, line removal, choosing which ink is the digit) is what makes a
scanned box look like MNIST, and is where real-paper accuracy is won or lost.

All functions take and return numpy arrays; none reads or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.morphology import skeletonize

from formreader.reading.locate import Box

MNIST_SIZE = 28
MNIST_BOX = 20
# Mean stroke width of MNIST digits, in pixels of the 28x28 image (ink area / skeleton length,
# measured on the training split with `stroke_width`). Thin pencil strokes are thickened to it.
MNIST_STROKE_WIDTH = 2.6


@dataclass(frozen=True)
class SegmentParams:
    """Knobs of cell segmentation; fractions are of the crop's shorter side unless named."""

    min_contrast: float = 15.0  # grey levels between paper and ink, at the least...
    noise_contrast: float = 6.0  # ...and at least this many times the paper's noise (std)
    min_digit_extent: float = 0.2  # a digit's tallest side, as a fraction of the crop side
    min_digit_area: float = 0.004  # a digit's ink area, as a fraction of the crop area
    companion_area: float = 0.12  # a stroke piece kept beside the main one: area vs the main's,
    companion_extent: float = 0.25  # ...its longer side vs the main one's (a dot is not a stroke)
    companion_gap: float = 0.25  # ...and its distance to the main one, vs the main one's size
    line_length: float = 0.75  # a straight run this long (fraction of the side) is a box line...
    line_band: float = 0.2  # ...when it lies this close to the crop's edge
    stroke_gap: float = 0.04  # pieces of one stroke closer than this are joined
    thicken: bool = True  # thicken thin strokes to MNIST's stroke width
    seed_depth: float = 0.5  # a stroke must somewhere be this dark (fraction of the darkest ink)...
    grow_depth: float = 0.25  # ...and extends through pixels this dark
    seed_limit: float = 60.0  # grey levels below the paper that always count as a stroke
    sharpen: bool = True  # keep strokes crisp when a small digit is enlarged


DEFAULT_PARAMS = SegmentParams()


@dataclass
class DigitSegment:
    """One segmented cell: the 28x28 input (ink 1.0 on 0.0), or None when the cell is blank."""

    image: np.ndarray | None  # (28, 28) float32 in [0, 1]; None: no digit in the cell
    stray_ink: float  # ink left after line removal, as a fraction of the crop, digit or not


def ink_intensity(grey: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """Estimate how much ink each pixel holds and which pixels are ink.

    grey: (H, W) uint8 or float, dark ink on light paper.
    Returns (ink, mask): ink (H, W) float32 in [0, 1], 1 at the darkest ink; mask (H, W) bool.
    Thresholding is by hysteresis, relative to the paper: pixels clearly darker than the paper
    seed the strokes, which then grow through fainter connected pixels, so faint pencil keeps
    its thin ends without admitting noise. "Clearly darker" adapts to the crop: half the depth
    of its darkest ink, but never more than `seed_limit` grey levels (box lines are far darker
    than a pencil digit) nor less than the contrast that the paper's noise allows.
    """
    g = grey.astype(np.float32)
    if min(g.shape) >= 12:
        g = cv2.GaussianBlur(g, (3, 3), 0.6)  # scanner noise, not stroke detail
    # The statistics below are order statistics of grey levels: read off a histogram of whole
    # levels rather than sorting the crop's pixels again for each.
    counts = _histogram(g)
    paper = _level_at(counts, 0.90)
    darkest = _level_at(counts, 0.005)
    # Noise from the pixels near paper level only: ink must not inflate it.
    near = counts * (np.arange(256) > paper - 25)
    if near.any():
        middle = _level_at(near, 0.5)
        deviations = np.bincount(np.abs(np.arange(256) - int(middle)), weights=near, minlength=256)
        noise = 1.4826 * _level_at(deviations, 0.5)
    else:
        noise = 0.0
    contrast = max(params.min_contrast, params.noise_contrast * noise)
    depth = paper - darkest
    if depth < contrast:
        return np.zeros(g.shape, np.float32), np.zeros(g.shape, bool)
    high = paper - max(contrast, min(params.seed_depth * depth, params.seed_limit))
    low = paper - max(0.6 * contrast, min(params.grow_depth * depth, 0.5 * params.seed_limit))
    mask = hysteresis(g < low, g < high)
    ink_level = _level_at(_histogram(g[mask]), 0.10) if mask.any() else darkest
    ink = np.clip((paper - g) / max(paper - ink_level, 1.0), 0.0, 1.0)
    return ink.astype(np.float32), mask


def _histogram(grey: np.ndarray) -> np.ndarray:
    """(256,) counts of the whole grey levels of float pixels (any shape)."""
    return np.bincount(np.clip(grey + 0.5, 0, 255).astype(np.uint8).ravel(), minlength=256)


def _level_at(counts: np.ndarray, q: float) -> float:
    """The grey level below which a share `q` of the pixels lie, from their (256,) histogram."""
    cumulative = np.cumsum(counts)
    return float(np.searchsorted(cumulative, q * cumulative[-1]))


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The `weak` pixels connected (4-neighbours) to a `strong` one. (H, W) bool in and out."""
    count, labels = cv2.connectedComponents(weak.astype(np.uint8), connectivity=4)
    seeded = np.zeros(count, bool)
    seeded[labels[strong & weak]] = True
    seeded[0] = False
    return seeded[labels]


def remove_box_lines(mask: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> np.ndarray:
    """Remove long straight horizontal and vertical runs (box lines) from a binary mask.

    mask: (H, W) bool. Returns a new (H, W) bool mask. A run must span `line_length` of the
    crop's width (or height) and lie in the band `line_band` along an edge to count as a box
    line: a digit's own straight strokes (the stem of a 1) are shorter or further inside.
    """
    h, w = mask.shape
    m = mask.astype(np.uint8)
    horiz = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((1, max(3, int(params.line_length * w))), np.uint8))
    vert = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((max(3, int(params.line_length * h)), 1), np.uint8))
    band_h, band_w = max(1, int(params.line_band * h)), max(1, int(params.line_band * w))
    horiz[band_h : h - band_h, :] = 0
    vert[:, band_w : w - band_w] = 0
    # Widen each line by a pixel across itself only (its anti-aliased edge), so a stroke that
    # touches or crosses it keeps its pixels along the line.
    lines = cv2.dilate(horiz, np.ones((3, 1), np.uint8)) | cv2.dilate(vert, np.ones((1, 3), np.uint8))
    return mask & ~lines.astype(bool)


def select_digit_ink(mask: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> np.ndarray | None:
    """Keep the ink that forms the digit: the largest stroke and pieces close to it.

    Drops specks, dots beside the digit and fragments of box lines along the crop's edges.
    mask: (H, W) bool. Returns the kept (H, W) bool mask, or None when no digit is there.
    """
    h, w = mask.shape
    side = min(h, w)
    # Label pieces joined across small gaps (pencil skips, the top bar of a 5), but count and
    # keep only the ink itself.
    gap = max(1, round(params.stroke_gap * side))
    joined = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2))
    n, labels = cv2.connectedComponents(joined, connectivity=8)
    labels = np.where(mask, labels, 0)
    candidates = []
    for i in range(1, n):
        ys, xs = np.nonzero(labels == i)
        if len(ys) == 0:
            continue
        x, y = int(xs.min()), int(ys.min())
        bw, bh, area = int(xs.max()) - x + 1, int(ys.max()) - y + 1, len(ys)
        # A piece of box line left at an edge: thin, parallel to the edge it touches.
        at_top_or_bottom = (y <= 1 or y + bh >= h - 1) and bh <= 0.15 * h and bw >= 2 * bh
        at_left_or_right = (x <= 1 or x + bw >= w - 1) and bw <= 0.15 * w and bh >= 2 * bw
        if (at_top_or_bottom or at_left_or_right) and area < 0.5 * bw * bh + 4 * max(bw, bh):
            continue
        candidates.append((area, i, x, y, bw, bh))
    if not candidates:
        return None
    candidates.sort(reverse=True)
    area, i, x, y, bw, bh = candidates[0]
    if max(bw, bh) < params.min_digit_extent * side:
        return None
    keep = labels == i
    reach = params.companion_gap * max(bw, bh)
    x0, y0, x1, y1 = x - reach, y - reach, x + bw + reach, y + bh + reach
    for a, j, cx, cy, cw, ch in candidates[1:]:
        near = cx < x1 and cx + cw > x0 and cy < y1 and cy + ch > y0
        if near and a >= params.companion_area * area and max(cw, ch) >= params.companion_extent * max(bw, bh):
            keep |= labels == j
    if keep.sum() < params.min_digit_area * h * w:
        return None
    return keep


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: ink mass over skeleton length. ink: (H, W) float in [0, 1]."""
    skeleton = skeletonize(ink > 0.5)
    length = max(int(skeleton.sum()), 1)
    return float(ink.sum()) / length


def normalize_digit(ink: np.ndarray, thicken: bool = True, sharpen: bool = True) -> np.ndarray:
    """Turn an ink map into a 28x28 MNIST-style image.

    ink: (H, W) float in [0, 1], ink high; everything outside the digit already zero.
    Returns (28, 28) float32: the digit fitted in 20x20 (aspect kept), centre of mass at
    (14, 14). With `thicken`, strokes thinner than MNIST's are grown to its width, since thin
    pencil and low-resolution scans otherwise give digits the model has never seen.
    """
    ys, xs = np.nonzero(ink > 0.05)
    if len(ys) == 0:
        return np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    h, w = crop.shape
    scale = MNIST_BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(crop, (nw, nh), interpolation=interp)
    small = np.clip(small / max(float(small.max()), 1e-6), 0, 1)
    if sharpen and scale > 1.5:
        # Enlarging smears a stroke's edge over several pixels; MNIST strokes have a solid core
        # and a one-pixel anti-aliased edge. Re-steepen the edge.
        small = np.clip((small - 0.2) / 0.5, 0, 1)
    if thicken:
        width = stroke_width(small)
        if width < MNIST_STROKE_WIDTH - 0.6:
            k = 2 if width > MNIST_STROKE_WIDTH - 1.2 else 3
            small = np.maximum(small, cv2.dilate(small, np.ones((k, k), np.uint8)) * 0.85)
    small = np.clip(small / max(float(small.max()), 1e-6), 0, 1)
    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    top, left = (MNIST_SIZE - nh) // 2, (MNIST_SIZE - nw) // 2
    canvas[top : top + nh, left : left + nw] = small
    total = canvas.sum()
    cy = (canvas.sum(axis=1) @ np.arange(MNIST_SIZE)) / total
    cx = (canvas.sum(axis=0) @ np.arange(MNIST_SIZE)) / total
    shift = np.float32([[1, 0, (MNIST_SIZE - 1) / 2 - cx], [0, 1, (MNIST_SIZE - 1) / 2 - cy]])
    return cv2.warpAffine(canvas, shift, (MNIST_SIZE, MNIST_SIZE), flags=cv2.INTER_LINEAR)


def remove_frame(mask: np.ndarray, interior: Box, reach: float = 0.04, run: float = 0.3) -> np.ndarray:
    """Remove a box's own border from a cell's ink mask, keeping the strokes that cross it.

    mask: (H, W) bool of the crop; interior: the box's inside (x, y, w, h) in crop pixels, as
    the template and the located box say. In the band along each side of the box (from `reach`
    of its side inside its interior to the crop's edge) the ink that runs along that side for
    `run` of the box's side is the border: thick or thin, ragged or broken, it is removed there,
    and so is the ink left in the band that reaches nowhere into the box; a stroke written across
    the line keeps its pixels on both sides. Returns a new (H, W) bool mask.
    The defaults were chosen on forms filled with MNIST's validation digits (both styles of
    formreader.training.synth.FORM_STYLES): a wider band or shorter run also takes the flat foot of a 2
    or the bottom of a 0 written close to the line.
    """
    x, y, w, h = interior
    side = min(w, h)
    s = max(1, round(reach * side))  # a ragged line's reach into the box, and the box's registration
    length = max(3, round(run * side))
    rows, cols = slice(max(0, y + s), max(0, y + h - s)), slice(max(0, x + s), max(0, x + w - s))  # the inside
    m = mask.astype(np.uint8)
    horiz = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((1, length), np.uint8))
    vert = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((length, 1), np.uint8))
    horiz[rows, :] = 0  # runs along the top and bottom sides only
    vert[:, cols] = 0  # and down the left and right ones
    # A ragged line's edge: a pixel across the line on each side goes with it.
    frame = cv2.dilate(horiz, np.ones((3, 1), np.uint8)) | cv2.dilate(vert, np.ones((1, 3), np.uint8))
    kept = mask & ~frame.astype(bool)
    # What is left in the band and reaches nowhere into the box is the line's debris (the short
    # pieces of a broken line): a stroke written across the line reaches inside.
    count, labels = cv2.connectedComponents(kept.astype(np.uint8), connectivity=8)
    reaching = np.zeros(count, bool)
    reaching[np.unique(labels[rows, cols])] = True
    reaching[0] = False
    return reaching[labels]


def digit_ink(
    crop: np.ndarray, params: SegmentParams = DEFAULT_PARAMS, interior: Box | None = None, printed: np.ndarray | None = None
) -> tuple[np.ndarray | None, float]:
    """The ink of the digit in a grey crop of a box, at the crop's own resolution.

    crop: (H, W) uint8, dark ink on light paper. Returns (ink, stray): ink (H, W) float32 in
    [0, 1], high on the digit's strokes and zero elsewhere, or None when the box is blank (no
    ink, or only specks and pieces of box line); stray: the ink left after line removal, as a
    fraction of the crop, digit or not. interior and printed: as for `segment_digit`.
    """
    ink, mask = ink_intensity(crop, params)
    if printed is not None:
        mask &= ~printed
    if interior is not None:
        mask = remove_frame(mask, interior)
    if not mask.any():
        return None, 0.0
    mask = remove_box_lines(mask, params)
    stray = float(mask.mean())
    keep = select_digit_ink(mask, params)
    if keep is None:
        return None, stray
    # Keep the anti-aliased fringe of the kept strokes, not of anything else.
    fringe = cv2.dilate(keep.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return np.where(fringe, ink, 0.0).astype(np.float32), stray


def segment_digit(
    crop: np.ndarray, params: SegmentParams = DEFAULT_PARAMS, interior: Box | None = None, printed: np.ndarray | None = None
) -> DigitSegment:
    """Segment one digit from a grey crop of a box (dark ink on light paper, any size).

    crop: (H, W) uint8. interior: where the box's inside lies in the crop (x, y, w, h), when the
    form's template says so: then the border is removed wherever it runs (`remove_frame`), so
    that no piece of it (thick, ragged or broken, as bitonal scans make them) passes for a
    stroke. Long straight runs along the crop's edges are taken for box lines in any case. The
    result's image is None when the box is blank (no ink, or only specks and pieces of box
    line); its stray_ink then tells how much rejected ink there was. printed: (H, W) bool, where
    the blank form has print in this crop (a registered page's cell): that ink is the form's
    own (ticks, dividers, borders of any style, wherever the template puts the box) and is
    dropped first; a stroke crossing it loses only the pixels on it.
    """
    ink, stray = digit_ink(crop, params, interior, printed)
    if ink is None:
        return DigitSegment(None, stray)
    return DigitSegment(normalize_digit(ink, params.thicken, params.sharpen), stray)


def segment_crops(crops) -> tuple[np.ndarray, np.ndarray]:
    """Segment grey crops (a sequence of (h, w) uint8 of any sizes, dark ink on light paper),
    each as a box's crop is. Returns (images (M, 28, 28) float32, index (M,) of the crops that
    were not judged blank)."""
    images, index = [], []
    for i, crop in enumerate(crops):
        seg = segment_digit(np.asarray(crop))
        if seg.image is not None:
            images.append(seg.image)
            index.append(i)
    return np.array(images, np.float32).reshape(-1, MNIST_SIZE, MNIST_SIZE), np.array(index, np.int64)
