"""Segmentation: from a grey cell crop (dark ink on light paper) to a 28x28 MNIST-style digit.

MNIST's own recipe is followed: the digit is fitted in a 20x20 box preserving its aspect ratio,
anti-aliased, and placed in a 28x28 field so that its centre of mass is at the centre. What
happens before that (thresholding, line removal, choosing which ink is the digit) is what makes a
scanned box look like MNIST, and is where real-paper accuracy is won or lost.

All functions take and return numpy arrays; none reads or writes files. The stages work on
stacks of crops of one shape, (N, H, W): a page's cells or a batch of digits are segmented with
one call to each OpenCV operation over a mosaic of the crops, laid apart so that none reaches
into its neighbour, which gives each crop exactly what it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from formreader.reading.locate import CELL_MARGIN, Box, cell_window

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
    loose_side: int = 80  # a crop wider than this (px), whose box is not known, judges a digit's
    # size as one this wide: a small digit in a loose crop is a digit (a box's own crop, its
    # interior known, judges it against the box, however large)
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
    tight_side: int = MNIST_BOX  # a crop no larger (px), its box not known, is a digit cut tight (digit_inks)
    small_side: int = MNIST_BOX  # a digit in a larger crop whose ink spans less (px) is read again from
    # the crop at twice its size (digit_inks)


DEFAULT_PARAMS = SegmentParams()


@dataclass
class DigitSegment:
    """One segmented cell: the 28x28 input (ink 1.0 on 0.0), or None when the cell is blank."""

    image: np.ndarray | None  # (28, 28) float32 in [0, 1]; None: no digit in the cell
    stray_ink: float  # ink left after line removal, as a fraction of the crop, digit or not
    beyond: float = 0.0  # handwriting beyond the box's top and bottom lines, share of its area (ink_beyond_boxes)
    view: np.ndarray | None = None  # (BOX_VIEW, BOX_VIEW) float32: the digit's ink as its box frames it (box_view)
    struck: float = 0.0  # the chance that the digit was struck through, as StrikeDetector tells from `view`


# A side (px) of a digit's ink seen at its box's scale (box_view): the 28x28 input is the digit
# cut tight, where a stroke across the box no longer looks longer than the digit's own strokes.
BOX_VIEW = 32


def box_view(ink: np.ndarray, interior: Box, crop_height: int) -> np.ndarray:
    """A digit's kept ink as its box frames it: the box's interior and a tenth of its side around,
    (BOX_VIEW, BOX_VIEW) float32, ink high.

    ink: (H, W) float in [0, 1], at the resolution of its crop (`crop_height` rows) or a multiple
    of it (a small digit is found again at twice the size, digit_inks); interior: the box's inside
    in the crop (x, y, w, h)."""
    scale = ink.shape[0] / crop_height
    x, y, w, h = (v * scale for v in interior)
    margin = 0.1 * max(w, h)
    top, left = int(max(0, y - margin)), int(max(0, x - margin))
    bottom, right = int(min(ink.shape[0], y + h + margin)), int(min(ink.shape[1], x + w + margin))
    return cv2.resize(ink[top:bottom, left:right].astype(np.float32), (BOX_VIEW, BOX_VIEW), interpolation=cv2.INTER_AREA)


def ink_intensity(grey: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """Estimate how much ink each pixel holds and which pixels are ink.

    grey: (N, H, W) uint8 or float, dark ink on light paper (or one crop, (H, W)).
    Returns (ink, mask) of grey's shape: ink float32 in [0, 1], 1 at the darkest ink; mask bool.
    Thresholding is by hysteresis, relative to the paper: pixels clearly darker than the paper
    seed the strokes, which then grow through fainter connected pixels, so faint pencil keeps
    its thin ends without admitting noise. "Clearly darker" adapts to each crop: half the depth
    of its darkest ink, but never more than `seed_limit` grey levels (box lines are far darker
    than a pencil digit) nor less than the contrast that the paper's noise allows.
    """
    if grey.ndim == 2:
        ink, mask = ink_intensity(grey[None], params)
        return ink[0], mask[0]
    g = grey.astype(np.float32)
    n, h, w = g.shape
    if min(h, w) >= 12:  # scanner noise, not stroke detail; each crop's edge mirrored as alone
        padded = np.concatenate([g[:, 1:2], g, g[:, -2:-1]], axis=1).reshape(-1, w)  # np.pad's "reflect", faster
        g = cv2.GaussianBlur(padded, (3, 3), 0.6).reshape(n, h + 2, w)[:, 1:-1]
    # The statistics below are order statistics of grey levels: read off each crop's histogram
    # of whole levels rather than sorting its pixels again for each.
    whole = _whole_levels(g) + (np.arange(n) * 256)[:, None, None]  # crop k's levels in bins 256k...
    counts = np.bincount(whole.ravel(), minlength=256 * n).reshape(n, 256)
    paper, darkest = _level_at(counts, 0.90), _level_at(counts, 0.005)
    # Noise from the pixels near paper level only: ink must not inflate it.
    near = counts * (_LEVELS > paper[:, None] - 25)
    middle = _level_at(near, 0.5)
    distance = np.abs(_LEVELS - middle[:, None].astype(int)) + (np.arange(n) * 256)[:, None]
    deviations = np.bincount(distance.ravel(), weights=near.ravel(), minlength=256 * n).reshape(n, 256)
    noise = np.where(near.any(axis=1), 1.4826 * _level_at(deviations, 0.5), 0.0)
    contrast = np.maximum(params.min_contrast, params.noise_contrast * noise)
    depth = paper - darkest
    high = paper - np.maximum(contrast, np.minimum(params.seed_depth * depth, params.seed_limit))
    low = paper - np.maximum(0.6 * contrast, np.minimum(params.grow_depth * depth, 0.5 * params.seed_limit))
    blank = depth < contrast  # no ink clearly darker than the paper
    # Compared in float32, the crops' own precision.
    mask = hysteresis(g < _per_crop(low), g < _per_crop(high))
    mask[blank] = False
    inked = mask.any(axis=(1, 2))
    counts_in_mask = np.bincount(whole[mask], minlength=256 * n).reshape(n, 256)
    ink_level = np.where(inked, _level_at(counts_in_mask, 0.10), darkest)
    ink = (_per_crop(paper) - g) / _per_crop(np.maximum(paper - ink_level, 1.0))
    ink = np.minimum(np.maximum(ink, 0.0, out=ink), 1.0, out=ink)
    ink[blank] = 0.0
    return ink, mask


_LEVELS = np.arange(256)


def _whole_levels(grey: np.ndarray) -> np.ndarray:
    """Float pixels (any shape) rounded to whole grey levels: uint8 of the same shape."""
    return np.minimum(np.maximum(grey + 0.5, 0), 255).astype(np.uint8)


def _level_at(counts: np.ndarray, q: float) -> np.ndarray:
    """The grey level below which a share `q` of the pixels lie, from their histograms: (N, 256)
    counts (or weights) in, (N,) float64 levels out."""
    cumulative = np.cumsum(counts, axis=1)
    return (cumulative < q * cumulative[:, -1:]).sum(axis=1).astype(np.float64)


def _per_crop(values: np.ndarray) -> np.ndarray:
    """(N,) per-crop values as float32 (N, 1, 1), to broadcast over a stack of crops."""
    return values.astype(np.float32)[:, None, None]


def _mosaic(stack: np.ndarray, apart: int) -> np.ndarray:
    """A stack (N, H, W) as one image (N * (H + apart), W): each crop followed by `apart` rows of
    zeros, so that a neighbourhood operation that reaches `apart` rows sees each crop alone."""
    n, h, w = stack.shape
    out = np.zeros((n, h + apart, w), stack.dtype)
    out[:, :h] = stack
    return out.reshape(n * (h + apart), w)


def _unmosaic(image: np.ndarray, n: int, h: int) -> np.ndarray:
    """The (N, H, W) crops of a `_mosaic` image (a view)."""
    return image.reshape(n, -1, image.shape[1])[:, :h]


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The `weak` pixels connected (4-neighbours) to a `strong` one. (H, W) or (N, H, W) bool in
    and out; crops of a stack are never connected to each other."""
    if weak.ndim == 3:
        n, h, _ = weak.shape
        return _unmosaic(hysteresis(_mosaic(weak, 1), _mosaic(strong, 1)), n, h)
    count, labels = cv2.connectedComponents(weak.astype(np.uint8), connectivity=4)
    seeded = np.zeros(count, bool)
    seeded[labels[strong & weak]] = True
    seeded[0] = False
    return seeded[labels]


def remove_box_lines(mask: np.ndarray, params: SegmentParams = DEFAULT_PARAMS, tight: bool = False) -> np.ndarray:
    """Remove long straight horizontal and vertical runs (box lines) from binary masks.

    mask: (N, H, W) bool. Returns a new (N, H, W) bool mask. A run must span `line_length` of the
    crop's width (or height) and lie in the band `line_band` along an edge to count as a box
    line: a digit's own straight strokes (the stem of a 1) are shorter or further inside. And it
    must behave as a box's line does (`_box_lines`): in a crop cut tight around the digit (a
    postal code's 16x16 digits, a check's digit cut by its box) the bar of a 7 or the foot of a
    2 runs along the edge too. tight: the crops are digits cut tight at a postal code's size
    (`digit_inks`), whose runs along the edges are strokes unless they close a box (`_closes_a_box`).
    """
    _, h, w = mask.shape
    across, down = max(3, int(params.line_length * w)), max(3, int(params.line_length * h))
    band_h, band_w = max(1, int(params.line_band * h)), max(1, int(params.line_band * w))
    # An opening keeps a run only in a row (column) with that much ink; outside the image
    # counts as ink to OpenCV's erosion, so a run at the edge needs only half the length.
    rows, cols = mask.sum(axis=2), mask.sum(axis=1)
    bands_h = np.concatenate([rows[:, :band_h], rows[:, h - band_h :]], axis=1).max(axis=1)
    bands_w = np.concatenate([cols[:, :band_w], cols[:, w - band_w :]], axis=1).max(axis=1)
    out = mask.copy()
    for k in np.flatnonzero((bands_h >= across // 2) | (bands_w >= down // 2)):
        m = mask[k].astype(np.uint8)
        horiz = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((1, across), np.uint8))
        vert = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((down, 1), np.uint8))
        horiz[band_h : h - band_h, :] = 0
        vert[:, band_w : w - band_w] = 0
        if horiz.any() or vert.any():
            if tight and not _closes_a_box(horiz, vert):
                continue
            out[k] &= ~_widened(*_box_lines(mask[k], horiz, vert, (band_h, band_w)))
    return out


def _closes_a_box(horiz: np.ndarray, vert: np.ndarray, full: float = 0.9) -> bool:
    """Do the runs found along a crop's edges (horiz, vert: (H, W) uint8) close a box: run along
    three sides of their joint extent, or along two opposite ones, each over `full` of it? A
    digit cut tight puts the side of a 0 or the bar and stem of a 7 on the crop's edges, and
    taken for lines they left nothing (a 0 judged blank) or a 1; an empty box's lines close it."""
    ys, xs = np.nonzero(horiz | vert)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    mid_y, mid_x = (y0 + y1) / 2, (x0 + x1) / 2
    sides = np.zeros(4, bool)  # top, bottom, left, right
    for d, runs in enumerate((horiz, vert)):
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(runs, connectivity=8)
        extent = (x1 - x0 + 1) if d == 0 else (y1 - y0 + 1)
        for i in range(1, count):
            if stats[i, cv2.CC_STAT_WIDTH if d == 0 else cv2.CC_STAT_HEIGHT] >= full * extent:
                at = centroids[i][1] < mid_y if d == 0 else centroids[i][0] < mid_x
                sides[2 * d + (0 if at else 1)] = True
    return sides.sum() >= 3 or (sides[0] and sides[1]) or (sides[2] and sides[3])


def _widened(horiz: np.ndarray, vert: np.ndarray) -> np.ndarray:
    """Horizontal and vertical runs (H, W) uint8, each widened by a pixel across itself only (its
    anti-aliased edge), so a stroke that touches or crosses a line keeps its pixels along it."""
    return (cv2.dilate(horiz, np.ones((3, 1), np.uint8)) | cv2.dilate(vert, np.ones((1, 3), np.uint8))).astype(bool)


def _box_lines(
    mask: np.ndarray, horiz: np.ndarray, vert: np.ndarray, bands: tuple[int, int], reach: float = 0.06
) -> tuple[np.ndarray, np.ndarray]:
    """Of the straight runs along a crop's edges, the ones that are a box's lines, not strokes.

    mask: (H, W) bool, the crop's ink; horiz, vert: (H, W) uint8, its horizontal and vertical
    runs; bands: how far (rows, columns) from the edges box lines are looked for. Returns the
    runs kept as lines, of the same form. A box's line runs past the digit inside it at both
    ends (by `reach` of the side), and a stroke meets it at one of its ends only where another
    line of the box does (a corner). A 7's bar in a crop cut tight around it runs past its stem
    by a pixel or two, and the stem leaves it at its end: the bar stays.
    """
    h, w = mask.shape
    rest = mask & ~_widened(horiz, vert)
    _, _, stats, _ = cv2.connectedComponentsWithStats(rest.astype(np.uint8), connectivity=8)
    # The digit's extent: the pieces of ink left that reach inside the bands along the edges,
    # specks and pieces of a ragged or broken line aside.
    x, y, bw, bh, area = stats[1:].T
    inside = (y + bh > bands[0]) & (y < h - bands[0]) & (x + bw > bands[1]) & (x < w - bands[1])
    stats = stats[1:][inside & ~_line_pieces(x, y, bw, bh, area, h, w)]
    if not len(stats):
        return horiz, vert  # nothing but lines and their debris
    area = stats[:, cv2.CC_STAT_AREA]
    big = stats[area >= 0.1 * area.max()]
    left, top = big[:, cv2.CC_STAT_LEFT], big[:, cv2.CC_STAT_TOP]
    spans = (
        (left.min(), (left + big[:, cv2.CC_STAT_WIDTH]).max() - 1, max(1, round(reach * w))),
        (top.min(), (top + big[:, cv2.CC_STAT_HEIGHT]).max() - 1, max(1, round(reach * h))),
    )
    runs = []
    for d, lines in enumerate((horiz, vert)):  # d: the axis a run goes along, 0 = x
        _, labels, st, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
        start = st[:, cv2.CC_STAT_LEFT] if d == 0 else st[:, cv2.CC_STAT_TOP]
        end = start + (st[:, cv2.CC_STAT_WIDTH] if d == 0 else st[:, cv2.CC_STAT_HEIGHT]) - 1
        lo, hi, margin = spans[d]
        past = (start <= lo - margin) & (end >= hi + margin)
        past[0] = False
        runs.append((labels, start, end, past))
    kept = []
    for d, (labels, start, end, past) in enumerate(runs):
        corners = runs[1 - d][3][runs[1 - d][0]]  # the other direction's lines
        for i in np.flatnonzero(past):
            past[i] = not _stroke_leaves_end(rest, labels == i, start[i], end[i], d, corners)
        kept.append(past[labels].astype(np.uint8))
    return kept[0], kept[1]


def _stroke_leaves_end(rest: np.ndarray, run: np.ndarray, start: int, end: int, axis: int, corners: np.ndarray) -> bool:
    """Does ink other than lines (rest, (H, W) bool) meet this run (H, W) bool, going along
    `axis` (0: x) from `start` to `end`, near one of its ends where no other line (corners)
    meets it? Near: within the run's thickness and two pixels."""
    ys, xs = np.nonzero(run)
    across = ys if axis == 0 else xs
    near = 2 + int(np.ptp(across))
    touching = cv2.dilate(run.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & rest
    position = np.nonzero(touching)[1 - axis]
    for a, b in ((start, start + near), (end - near, end)):
        zone = np.zeros_like(run)
        lo, hi = max(0, a - 2), b + 3
        side = slice(max(0, across.min() - near), across.max() + near + 1)
        zone[(side, slice(lo, hi)) if axis == 0 else (slice(lo, hi), side)] = True
        if not (corners & zone).any() and ((position >= a) & (position <= b)).any():
            return True
    return False


def select_digit_ink(
    mask: np.ndarray, params: SegmentParams = DEFAULT_PARAMS, boxed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ink that forms each crop's digit: its largest stroke and pieces close to it.

    Drops specks, dots beside the digit and fragments of box lines along the crop's edges.
    mask: (N, H, W) bool; boxed: (N,) bool, the crops whose box is known (the template's), whose
    digit's size is judged against the whole crop however large (`SegmentParams.loose_side`).
    Returns (keep (N, H, W) bool, found (N,) bool): the kept ink, and which crops have a digit
    at all (keep is empty where not).
    """
    n, h, w = mask.shape
    side = min(h, w)
    # Label pieces joined across small gaps (pencil skips, the top bar of a 5), but count and
    # keep only the ink itself.
    gap = max(1, round(params.stroke_gap * side))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2)
    joined = _unmosaic(cv2.dilate(_mosaic(mask.astype(np.uint8), gap), disk), n, h)
    count, labels = cv2.connectedComponents(_mosaic(joined, 1), connectivity=8)
    labels = np.where(mask, _unmosaic(labels, n, h), 0)
    # Each piece's label, crop, bounding box and area: (K,) arrays over the labels that have ink.
    label, crop, y, x, bh, bw = _label_boxes(labels)
    if not len(label):
        return np.zeros_like(mask), np.zeros(n, bool)
    area = np.bincount(labels.ravel(), minlength=count)[label]
    c = ~_line_pieces(x, y, bw, bh, area, h, w)
    label, crop, x, y, bw, bh, area = label[c], crop[c], x[c], y[c], bw[c], bh[c], area[c]
    # Each crop's main piece: its largest (the later label on a tie).
    order = np.lexsort((-label, -area, crop))
    first = order[np.r_[True, crop[order][1:] != crop[order][:-1]]] if len(order) else order
    main = np.full(n, -1)
    main[crop[first]] = first
    extent = np.maximum(bw, bh)
    found = np.zeros(n, bool)
    # A digit's least size, against the crop; a loose crop's (no box known) is capped.
    loose = np.full(n, min(1.0, params.loose_side / side))
    if boxed is not None:
        loose[boxed] = 1.0
    found[crop[first]] = extent[first] >= params.min_digit_extent * side * loose[crop[first]]
    # Pieces kept beside it: near it, and big and long enough not to be a dot or a speck.
    m = main[crop]
    reach = params.companion_gap * extent[m]
    near = (x < x[m] + bw[m] + reach) & (x + bw > x[m] - reach) & (y < y[m] + bh[m] + reach) & (y + bh > y[m] - reach)
    companion = near & (area >= params.companion_area * area[m]) & (extent >= params.companion_extent * extent[m])
    kept = np.zeros(count, bool)
    kept[label[(companion | (np.arange(len(label)) == m)) & found[crop]]] = True
    keep = kept[labels]
    found &= keep.sum(axis=(1, 2)) >= params.min_digit_area * h * w * loose**2
    keep[~found] = False
    return keep, found


def _label_boxes(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each label > 0 present in a stack of label images (N, H, W) int, in increasing order:
    (label, crop, y, x, height, width), (K,) int arrays; a label lies in one crop."""
    flat = labels.ravel()
    at = np.flatnonzero(flat)
    if not len(at):
        return (np.zeros(0, np.intp),) * 6
    at = at[np.argsort(flat[at], kind="stable")]
    label = flat[at]
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    crop, y, x = np.unravel_index(at, labels.shape)
    y0, x0 = np.minimum.reduceat(y, starts), np.minimum.reduceat(x, starts)
    y1, x1 = np.maximum.reduceat(y, starts), np.maximum.reduceat(x, starts)
    return label[starts], crop[starts], y0, x0, y1 - y0 + 1, x1 - x0 + 1


def _line_pieces(x: np.ndarray, y: np.ndarray, bw: np.ndarray, bh: np.ndarray, area: np.ndarray, h: int, w: int) -> np.ndarray:
    """Which pieces of ink (their boxes x, y, bw, bh and areas, (K,) arrays, in an (h, w) crop)
    are pieces of box line left at an edge: thin, parallel to the edge they touch."""
    at_top_or_bottom = ((y <= 1) | (y + bh >= h - 1)) & (bh <= 0.15 * h) & (bw >= 2 * bh)
    at_left_or_right = ((x <= 1) | (x + bw >= w - 1)) & (bw <= 0.15 * w) & (bh >= 2 * bw)
    return (at_top_or_bottom | at_left_or_right) & (area < 0.5 * bw * bh + 4 * np.maximum(bw, bh))


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: ink mass over skeleton length. ink: (H, W) float in [0, 1]."""
    return stroke_widths([ink])[0]


def stroke_widths(inks: list[np.ndarray]) -> list[float]:
    """`stroke_width` of each of several ink maps (any sizes), skeletonised together."""
    height, width = max(i.shape[0] for i in inks), max(i.shape[1] for i in inks)
    slots = np.zeros((len(inks), height, width), bool)
    for slot, ink in zip(slots, inks):
        slot[: ink.shape[0], : ink.shape[1]] = ink > 0.5
    lengths = thin_stack(slots).sum(axis=(1, 2))
    return [float(ink.sum()) / max(int(n), 1) for ink, n in zip(inks, lengths)]


# Zhang and Suen's thinning as scikit-image's `skeletonize` (2-D) does it, with which MNIST's
# stroke width above and the digit model's training crops were measured: for each pattern of a
# pixel's eight neighbours (bit 0 the one above, then clockwise: NE, E, SE, S, SW, W, NW),
# whether it may be removed in the first sub-iteration (1), the second (2) or either (3).
# Written out here (tests/test_segment.py compares the two) because importing scikit-image's
# morphology, and scipy's ndimage with it, cost each worker 0.25 s at its first page.
_THINNING = np.frombuffer(
    b"0001031100002233000030000000203200000000000000002000202030003032"
    b"0301000000000000300000002000000021010000000000002000000030002020"
    b"0103010300000003000000000000000200000000000000000000000000000000"
    b"0103000100000001100000000000000033030001000000003101000031002000",
    np.uint8,
) - ord("0")
_REMOVABLE = [(_THINNING & step).astype(bool).astype(np.uint8) for step in (1, 2)]
_NEIGHBOUR_BITS = np.float32([[128, 1, 2], [64, 0, 4], [32, 16, 8]])


def thin(mask: np.ndarray) -> np.ndarray:
    """The one-pixel-wide skeleton of a binary image: mask (H, W) bool -> (H, W) bool, as
    skimage.morphology.skeletonize."""
    return thin_stack(mask[None])[0]


def thin_stack(masks: np.ndarray) -> np.ndarray:
    """`thin` of each image of a stack: masks (N, H, W) bool -> (N, H, W) bool. Each
    sub-iteration removes, all at once, the pixels whose neighbours make them removable in it,
    until one round removes none. The images are thinned as one mosaic, a zero row apart (the
    neighbourhood reaches one row), and an image a round left unchanged leaves the mosaic: it
    would stay so, and thick strokes elsewhere take several times the rounds of most digits."""
    n, h, w = masks.shape
    image = np.zeros((n, h + 1, w), np.uint8)
    image[:, :h] = masks
    active = np.arange(n)
    while len(active):
        part = image[active]
        flat = part.reshape(-1, w)
        changed = np.zeros(len(active), bool)
        for removable in _REMOVABLE:
            # Each pixel's neighbour pattern as a byte (its neighbours' bits summed; 0-255, exact).
            codes = cv2.filter2D(flat, -1, _NEIGHBOUR_BITS, borderType=cv2.BORDER_CONSTANT)
            drop = cv2.LUT(codes, removable) & flat
            flat -= drop
            changed |= drop.reshape(part.shape).any(axis=(1, 2))
        image[active] = part
        active = active[changed]
    return image[:, :h].astype(bool)


def normalize_digit(ink: np.ndarray, thicken: bool = True, sharpen: bool = True) -> np.ndarray:
    """Turn an ink map into a 28x28 MNIST-style image (see `normalize_digits`).

    ink: (H, W) float in [0, 1], ink high; everything outside the digit already zero.
    Returns (28, 28) float32."""
    return normalize_digits([ink], thicken, sharpen)[0]


def normalize_digits(inks: list[np.ndarray], thicken: bool = True, sharpen: bool = True) -> np.ndarray:
    """Turn ink maps into 28x28 MNIST-style images.

    inks: (H, W) float arrays in [0, 1] (any sizes, or a stack), ink high; everything outside
    the digit already zero. Returns (N, 28, 28) float32: each digit fitted in 20x20 (aspect
    kept), centre of mass at (14, 14). With `thicken`, strokes thinner than MNIST's are grown
    to its width, since thin pencil and low-resolution scans otherwise give digits the model
    has never seen.
    """
    out = np.zeros((len(inks), MNIST_SIZE, MNIST_SIZE), np.float32)
    smalls, where = [], []
    for k, (ink, (top, bottom, left, right)) in enumerate(zip(inks, _ink_bounds(inks))):
        if bottom < top:
            continue
        crop = ink[top : bottom + 1, left : right + 1].astype(np.float32, copy=False)
        h, w = crop.shape
        scale = MNIST_BOX / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = _to_unit(cv2.resize(crop, (nw, nh), interpolation=interp))
        if sharpen and scale > 1.5:
            # Enlarging smears a stroke's edge over several pixels; MNIST strokes have a solid
            # core and a one-pixel anti-aliased edge. Re-steepen the edge.
            small = np.clip((small - 0.2) / 0.5, 0, 1)
        smalls.append(small)
        where.append(k)
    widths = stroke_widths(smalls) if thicken and smalls else [MNIST_STROKE_WIDTH] * len(smalls)
    canvases = np.zeros((len(smalls), MNIST_SIZE, MNIST_SIZE), np.float32)
    for canvas, small, width in zip(canvases, smalls, widths):
        if width < MNIST_STROKE_WIDTH - 0.6:
            # Grown by at most 0.85 of its darkest ink, which is 1: the result's darkest is 1 still.
            grow = 2 if width > MNIST_STROKE_WIDTH - 1.2 else 3
            small = np.maximum(small, cv2.dilate(small, np.ones((grow, grow), np.uint8)) * 0.85)
        nh, nw = small.shape
        top, left = (MNIST_SIZE - nh) // 2, (MNIST_SIZE - nw) // 2
        canvas[top : top + nh, left : left + nw] = small
    # Each digit's centre of mass moved to the image's centre.
    total = canvases.sum(axis=(1, 2))
    cy = (canvases.sum(axis=2) @ _CENTRES) / total
    cx = (canvases.sum(axis=1) @ _CENTRES) / total
    middle = (MNIST_SIZE - 1) / 2
    for k, canvas, dy, dx in zip(where, canvases, middle - cy, middle - cx):
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        out[k] = cv2.warpAffine(canvas, shift, (MNIST_SIZE, MNIST_SIZE), flags=cv2.INTER_LINEAR)
    return out


_CENTRES = np.arange(MNIST_SIZE)


def _to_unit(image: np.ndarray) -> np.ndarray:
    """A non-negative float image divided by its maximum, so that its darkest ink is 1 (and
    none is above: x / m <= 1 for x <= m, rounded as IEEE divides)."""
    return image / max(float(image.max()), 1e-6)


def _ink_bounds(inks: list[np.ndarray]) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right), inclusive, of the pixels above 0.05 of each ink map; bottom <
    top where there are none. Maps of one shape are measured together."""
    if not inks:
        return []
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, ink in enumerate(inks):
        by_shape.setdefault(ink.shape, []).append(k)
    if len(by_shape) > 1:
        bounds: list = [None] * len(inks)
        for members in by_shape.values():
            for k, one in zip(members, _ink_bounds([inks[k] for k in members])):
                bounds[k] = one
        return bounds
    seen = np.stack(inks) > 0.05
    rows, cols = seen.any(axis=2), seen.any(axis=1)
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)
    bottom, right = rows.shape[1] - 1 - rows[:, ::-1].argmax(axis=1), cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
    bottom[~rows.any(axis=1)] = -1
    return list(zip(top.tolist(), bottom.tolist(), left.tolist(), right.tolist()))


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
    return remove_frames(mask[None], [interior], reach, run)[0]


def remove_frames(masks: np.ndarray, interiors: list[Box], reach: float = 0.04, run: float = 0.3) -> np.ndarray:
    """`remove_frame` of a stack of crops: masks (N, H, W) bool, one interior each; returns a
    new (N, H, W) bool. Crops whose borders are as long are done together, as one image."""
    out = np.zeros_like(masks)
    sides = [min(w, h) for _, _, w, h in interiors]
    lengths = np.array([max(3, round(run * side)) for side in sides])
    # Not np.unique: its first call imports numpy.ma, 40 ms of every worker's first page.
    for length in sorted(set(lengths.tolist())):
        group = np.flatnonzero(lengths == length)
        n, h = len(group), masks.shape[1]
        stack = masks[group].astype(np.uint8)
        # One row of paper between crops: no dilation or connection crosses it.
        m = _mosaic(stack, 1)
        horiz = _unmosaic(cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((1, int(length)), np.uint8)), n, h)
        vert = _vertical_runs(stack, int(length))
        insides = []
        for i, k in enumerate(group):
            x, y, w, hh = interiors[k]
            s = max(1, round(reach * sides[k]))  # a ragged line's reach into the box, and the box's registration
            inside = slice(max(0, y + s), max(0, y + hh - s)), slice(max(0, x + s), max(0, x + w - s))
            horiz[i, inside[0], :] = 0  # runs along the top and bottom sides only
            vert[i, :, inside[1]] = 0  # and down the left and right ones
            insides.append(inside)
        # A ragged line's edge: a pixel across the line on each side goes with it.
        frame = _widened(_mosaic(horiz, 1), _mosaic(vert, 1))
        kept = m.astype(bool) & ~frame
        # What is left in the band and reaches nowhere into the box is the line's debris (the
        # short pieces of a broken line): a stroke written across the line reaches inside.
        count, labels = cv2.connectedComponents(kept.astype(np.uint8), connectivity=8)
        crops = _unmosaic(labels, n, h)
        reaching = np.zeros(count, bool)
        for i, (rows, cols) in enumerate(insides):
            reaching[crops[i, rows, cols].ravel()] = True
        reaching[0] = False
        out[group] = reaching[crops]
    return out


def _vertical_runs(stack: np.ndarray, length: int) -> np.ndarray:
    """The opening of each crop of a stack (N, H, W) uint8 by a vertical line of `length`, as
    OpenCV opens one crop alone: beyond its top and bottom edges counts as ink to the erosion
    and as nothing to the dilation. Done on one image of all the crops, with rows of ink apart
    (erosion) that are then cleared (dilation), so that no run reaches from one crop to the next."""
    n, h, w = stack.shape
    apart = length // 2 + 1
    rows = np.ones((n, h + apart, w), np.uint8)
    rows[:, :h] = stack
    line = np.ones((length, 1), np.uint8)
    eroded = cv2.erode(rows.reshape(-1, w), line).reshape(n, h + apart, w)
    eroded[:, h:] = 0
    return _unmosaic(cv2.dilate(eroded.reshape(-1, w), line), n, h)


def digit_inks(
    crops: np.ndarray,
    params: SegmentParams = DEFAULT_PARAMS,
    interiors: list[Box | None] | None = None,
    printed: np.ndarray | None = None,
) -> tuple[list[np.ndarray | None], np.ndarray]:
    """The ink of the digit in each grey crop of a box, at the crops' own resolution (twice it
    for digits cut tight or small, below).

    crops: (N, H, W) uint8, dark ink on light paper. Returns (inks, stray): inks, N arrays
    (H, W) float32 in [0, 1] ((2H, 2W) where read enlarged), high on the digit's strokes and zero elsewhere, or None where the
    box is blank (no ink, or only specks and pieces of box line); stray (N,): the ink left after
    line removal, as a fraction of the crop, digit or not. interiors (N boxes or None) and
    printed ((N, H, W) bool): as for `segment_digit`.

    Crops no larger than `params.tight_side` (MNIST's 20-px digit box) and with no box known are
    digits cut tight at a postal code's size (USPS: 16x16): they are read at twice their size
    (cubic), where a stroke a pixel or two wide keeps its shape through the ink threshold, and
    the straight runs along their edges are the digit's strokes unless they close a box
    (`remove_box_lines`). So is a digit found smaller than `params.small_side` in a larger crop
    (written small in its box, or cut small with much paper around it, as exam boxes are): its
    ink is found again in the crop enlarged (its box's interior and print with it), where a loop
    a few pixels across stays open.
    """
    crops = np.asarray(crops)
    framed = [k for k, interior in enumerate(interiors or ()) if interior is not None]
    tight = printed is None and not framed and min(crops.shape[1:]) <= params.tight_side
    inks, stray = _inks_at(np.stack([_twice(c) for c in crops]) if tight else crops, params, interiors, printed, tight)
    if not tight:
        found = [k for k, ink in enumerate(inks) if ink is not None]
        bounds = _ink_bounds([inks[k] for k in found])
        spans = [max(bottom - top, right - left) + 1 for top, bottom, left, right in bounds]
        small = [k for k, span in zip(found, spans) if span < params.small_side]
        if small:
            twice_interiors = None if interiors is None else [
                None if interiors[k] is None else tuple(2 * v for v in interiors[k]) for k in small
            ]
            twice_printed = None if printed is None else np.stack(
                [cv2.resize(printed[k].astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST) > 0 for k in small]
            )
            again, _ = _inks_at(np.stack([_twice(crops[k]) for k in small]), params, twice_interiors, twice_printed, False)
            for k, ink in zip(small, again):
                inks[k] = inks[k] if ink is None else ink
    return inks, stray


def _twice(crop: np.ndarray) -> np.ndarray:
    """A grey crop (H, W) enlarged to (2H, 2W), cubic."""
    return cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)


def _inks_at(
    crops: np.ndarray, params: SegmentParams, interiors: list[Box | None] | None, printed: np.ndarray | None, tight: bool
) -> tuple[list[np.ndarray | None], np.ndarray]:
    """`digit_inks` of crops at the resolution they are read at (tight: enlarged, see there)."""
    framed = [k for k, interior in enumerate(interiors or ()) if interior is not None]
    ink, mask = ink_intensity(crops, params)
    if printed is not None:
        mask &= ~printed
    if framed:
        mask[framed] = remove_frames(mask[framed], [interiors[k] for k in framed])
    mask = remove_box_lines(mask, params, tight)
    stray = mask.mean(axis=(1, 2))
    boxed = np.array([i is not None for i in interiors], bool) if interiors is not None else None
    keep, found = select_digit_ink(mask, params, boxed)
    # Keep the anti-aliased fringe of the kept strokes, not of anything else.
    n, h, _ = keep.shape
    fringe = _unmosaic(cv2.dilate(_mosaic(keep.astype(np.uint8), 1), np.ones((3, 3), np.uint8)), n, h)
    inks = np.where(fringe.astype(bool), ink, 0.0).astype(np.float32)
    return [inks[k] if found[k] else None for k in range(n)], stray


def digit_ink(
    crop: np.ndarray, params: SegmentParams = DEFAULT_PARAMS, interior: Box | None = None, printed: np.ndarray | None = None
) -> tuple[np.ndarray | None, float]:
    """`digit_inks` of one crop (H, W): (ink (H, W) float32 or None where blank, stray)."""
    inks, stray = digit_inks(crop[None], params, [interior], None if printed is None else printed[None])
    return inks[0], float(stray[0])


def segment_digits(
    crops: np.ndarray,
    params: SegmentParams = DEFAULT_PARAMS,
    interiors: list[Box | None] | None = None,
    printed: np.ndarray | None = None,
) -> list[DigitSegment]:
    """Segment one digit from each grey crop of a box (dark ink on light paper).

    crops: (N, H, W) uint8, crops of one shape. interiors: where each box's inside lies in its
    crop (x, y, w, h), when the form's template says so: then the border is removed wherever it
    runs (`remove_frame`), so that no piece of it (thick, ragged or broken, as bitonal scans
    make them) passes for a stroke. Long straight runs along the crops' edges are taken for box
    lines in any case. A result's image is None when its box is blank (no ink, or only specks
    and pieces of box line); its stray_ink then tells how much rejected ink there was.
    printed: (N, H, W) bool, where the blank form has print in each crop (a registered page's
    cells): that ink is the form's own (ticks, dividers, borders of any style, wherever the
    template puts the box) and is dropped first; a stroke crossing it loses only the pixels on it.
    """
    crops = np.asarray(crops)
    inks, stray = digit_inks(crops, params, interiors, printed)
    found = [k for k, ink in enumerate(inks) if ink is not None]
    images = normalize_digits([inks[k] for k in found], params.thicken, params.sharpen)
    segments = [DigitSegment(None, float(s)) for s in stray]
    for k, image in zip(found, images):
        framed = interiors is not None and interiors[k] is not None
        view = box_view(inks[k], interiors[k], crops.shape[1]) if framed else None
        segments[k] = DigitSegment(image, float(stray[k]), view=view)
    return segments


def segment_digit(
    crop: np.ndarray, params: SegmentParams = DEFAULT_PARAMS, interior: Box | None = None, printed: np.ndarray | None = None
) -> DigitSegment:
    """`segment_digits` of one crop (H, W) uint8, of any size."""
    return segment_digits(np.asarray(crop)[None], params, [interior], None if printed is None else printed[None])[0]


def segment_cells(
    crops: list[np.ndarray],
    params: SegmentParams = DEFAULT_PARAMS,
    interiors: list[Box | None] | None = None,
    printed: list[np.ndarray] | None = None,
    batch: int = 256,
) -> list[DigitSegment]:
    """`segment_digits` of crops of any sizes (a list of (h, w) uint8, with their interiors and
    printed masks if given): those of one shape are segmented together, `batch` at a time."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, crop in enumerate(crops):
        by_shape.setdefault(np.shape(crop), []).append(k)
    segments: list[DigitSegment | None] = [None] * len(crops)
    for members in by_shape.values():
        for i in range(0, len(members), batch):
            part = members[i : i + batch]
            done = segment_digits(
                np.stack([crops[k] for k in part]),
                params,
                None if interiors is None else [interiors[k] for k in part],
                None if printed is None else np.stack([printed[k] for k in part]),
            )
            for k, seg in zip(part, done):
                segments[k] = seg
    return segments


def ink_beyond_boxes(
    page: np.ndarray,
    printed: np.ndarray,
    boxes: list[Box],
    keep_out: list[Box] = (),
    margin: float = CELL_MARGIN,
    reach: float = 0.3,
    likes: list[Box] | None = None,
) -> np.ndarray:
    """How much handwriting lies beyond each box's top and bottom lines, on a registered page.

    page: (H, W) uint8; printed: (H, W) bool, the blank form's print (ReferenceFeatures.printed);
    boxes: the interiors (x, y, w, h) of the page's cells. For each box, the ink in the bands above
    and below it (`reach` of its height, over its columns) that is neither print nor inside any of
    `boxes` or `keep_out` (a free field's box) and joined to the band's edge nearer the box, as a
    share of the box's area: (N,) float32.
    A digit written taller than its box is cut where it crosses the box's line, or at the edge of
    its crop (`locate.cell_crop`), and read as another digit (a 0 as a 3); what it left beyond the
    line says so. Writing inside its box leaves nothing there, whatever the line's style.
    likes: each box's template box (as `locate.cell_crop`'s `like`): the bands are as wide and high
    as that box's would be, centred on the box found, so that a page's bands come in one shape
    and are measured together (boxes found a pixel or two apart in size made 3-5 stacks a page).
    """
    H, W = page.shape
    inside = printed.copy()  # and every box's interior: what is not handwriting beyond a box
    for x, y, w, h in [*boxes, *keep_out]:
        inside[max(0, y) : max(0, y + h), max(0, x) : max(0, x + w)] = True
    bands: dict[tuple[int, int], list[tuple[int, slice, slice, bool]]] = {}  # (box, rows, columns, below it)
    for k, (x, y, w, h) in enumerate(boxes):
        like = None if likes is None else likes[k]
        lh = h if like is None else like[3]
        m, r = round(margin * lh), max(2, round((margin + reach) * lh))
        _, cols = cell_window((H, W), (x, y, w, h), 0.0, like)  # the box's columns, as its cell is cut
        for rows, below in ((slice(max(0, y - r), max(0, y - m)), False), (slice(min(H, y + h + m), min(H, y + h + r)), True)):
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            if min(shape) > 0:
                bands.setdefault(shape, []).append((k, rows, cols, below))
    areas = np.array([max(1, w * h) for *_, w, h in boxes], np.float32)
    beyond = np.zeros(len(boxes), np.float32)
    for group in bands.values():
        _, ink = ink_intensity(np.stack([page[rows, cols] for _, rows, cols, _ in group]))
        # A stroke that went on past the line comes into the band from its edge nearer the box,
        # through the line's own ink where a thick line reaches into it; ink joined to neither (dust,
        # a toner speck, a stray dot) is not writing crossing the line.
        below = np.array([b for *_, b in group])
        edge = np.zeros_like(ink)
        edge[below, 0], edge[~below, -1] = ink[below, 0], ink[~below, -1]
        mask = hysteresis(ink, edge) & ~np.stack([inside[rows, cols] for _, rows, cols, _ in group])
        k = np.array([k for k, *_ in group])
        np.add.at(beyond, k, np.count_nonzero(mask, axis=(1, 2)) / areas[k])
    return beyond


def segment_crops(crops) -> tuple[np.ndarray, np.ndarray]:
    """Segment grey crops (a sequence of (h, w) uint8 of any sizes, dark ink on light paper),
    each as a box's crop is. Returns (images (M, 28, 28) float32, index (M,) of the crops that
    were not judged blank)."""
    segments = segment_cells([np.asarray(c) for c in crops])
    index = [k for k, seg in enumerate(segments) if seg.image is not None]
    images = [segments[k].image for k in index]
    return np.array(images, np.float32).reshape(-1, MNIST_SIZE, MNIST_SIZE), np.array(index, np.int64)
