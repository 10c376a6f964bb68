"""Locate: find the digit boxes printed on a page.

Boxes are found as the holes enclosed by the page's straight lines: long horizontal and
vertical runs are kept by morphological opening (which drops handwriting and most text), and
every hole of that line drawing that is a plausible box is one cell. A comb (one frame divided
by ticks) gives one hole per cell just as separate squares do. The same finder proposes
templates from a blank form and refines a registered page's cells to where its boxes really are.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, width, height in pixels; a box's interior


@dataclass(frozen=True)
class BoxLimits:
    """Sizes a digit box's interior may have, in inches (converted with the page's DPI)."""

    min_side: float = 0.12
    max_side: float = 1.0
    max_aspect: float = 2.2  # longer side / shorter side


def line_mask(grey: np.ndarray, min_line: int, dotted: bool = False) -> np.ndarray:
    """Pixels of straight horizontal or vertical lines at least `min_line` px long.

    grey: (H, W) uint8, dark lines on light paper. Returns (H, W) uint8, 255 on lines. With
    `dotted`, gaps of a few pixels along a line are bridged first, so dotted and dashed lines
    count: for blank forms only, since on a filled one it joins handwriting into lines too.
    """
    block = max(15, (min_line * 2) | 1)
    ink = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, 12)
    gap = max(5, min_line // 4) | 1 if dotted else 1
    horiz = _straight_runs(ink, (1, gap), (1, min_line))
    vert = _straight_runs(ink, (gap, 1), (min_line, 1))
    if dotted:  # each line a little longer at its ends, so a dashed frame's corners close
        horiz, vert = cv2.dilate(horiz, np.ones((1, gap), np.uint8)), cv2.dilate(vert, np.ones((gap, 1), np.uint8))
    lines = cv2.bitwise_or(horiz, vert)
    # Close the one-pixel breaks that scanning and JPEG leave in thin lines.
    return cv2.morphologyEx(lines, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))


def _straight_runs(ink: np.ndarray, join: tuple[int, int], length: tuple[int, int]) -> np.ndarray:
    """Ink in straight runs of at least `length` (a kernel shape), gaps shorter than `join` bridged."""
    joined = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, np.ones(join, np.uint8))
    return cv2.morphologyEx(joined, cv2.MORPH_OPEN, np.ones(length, np.uint8))


def find_boxes(
    grey: np.ndarray, dpi: float, limits: BoxLimits = BoxLimits(), min_line: int | None = None, blank: bool = False
) -> list[Box]:
    """Interiors of the rectangular boxes on a page, in reading order (top-down, left-right).

    grey: (H, W) uint8. dpi: pixels per inch of `grey`, to know what size a box can be.
    min_line: shortest straight run (px) taken as a printed line; default 0.6 of the smallest box.
    blank: the page is a blank form (no handwriting): dotted lines count too (`line_mask`).
    """
    min_side, max_side = limits.min_side * dpi, limits.max_side * dpi
    lines = line_mask(grey, min_line or max(8, int(0.6 * min_side)), dotted=blank)
    contours, hierarchy = cv2.findContours(lines, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    boxes: list[Box] = []
    if hierarchy is None:
        return boxes
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        if parent < 0:
            continue  # an outer outline of lines, not a hole
        x, y, w, h = cv2.boundingRect(contour)
        if not (min_side <= min(w, h) and max(w, h) <= max_side and max(w, h) <= limits.max_aspect * min(w, h)):
            continue
        if cv2.contourArea(contour) < 0.8 * w * h:
            continue  # not rectangular
        # The hole's contour runs on the line pixels around it: the interior is 1 px inside.
        boxes.append((int(x) + 1, int(y) + 1, int(w) - 2, int(h) - 2))
    return sort_reading_order(boxes)


def find_tick_cells(grey: np.ndarray, dpi: float, limits: BoxLimits = BoxLimits()) -> list[Box]:
    """Interiors of the boxes of combs printed as ticks on a line (a common style: a base line
    with short ticks rising between the boxes, or a top line with ticks hanging from it), which
    enclose no hole for `find_boxes` to find. Between two ticks of one line, a box-sized gap is
    a cell, as high as it is wide. grey: (H, W) uint8. Returns boxes in reading order."""
    min_side, max_side = limits.min_side * dpi, limits.max_side * dpi
    ink = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, max(15, int(min_side) | 1), 12)
    lines = cv2.morphologyEx(ink, cv2.MORPH_OPEN, np.ones((1, max(8, int(2 * min_side))), np.uint8))
    # Ticks: upright runs half a small box high at least (a tilted line's steps are a few px).
    ticks = cv2.morphologyEx(ink, cv2.MORPH_OPEN, np.ones((max(6, int(0.5 * min_side)), 1), np.uint8)) > 0
    count, labels, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    cells: list[Box] = []
    height = grey.shape[0]
    for i, (x, y, w, h, area) in enumerate(stats[1:], start=1):
        if area / w > 0.05 * dpi:
            continue  # a bar or a block, not a printed line
        # Each column's top and bottom of the line, so that a slightly tilted line is followed.
        on = labels[y : y + h, x : x + w] == i
        filled = on.any(axis=0)
        tops = y + np.argmax(on, axis=0)
        bottoms = y + h - 1 - np.argmax(on[::-1], axis=0)
        columns = np.arange(x, x + w)
        for rising in (True, False):
            rows = np.clip(tops - 2 if rising else bottoms + 2, 0, height - 1)
            touching = filled & ticks[rows, columns]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], touching.astype(np.int8), [0]])))
            runs = list(zip(edges[::2], edges[1::2] - 1))  # (first, last) column of each tick, from x
            for (_, left), (right, _) in zip(runs, runs[1:]):
                side = int(right - left - 1)
                if min_side <= side <= max_side:
                    base = int(tops[left + 1 : right].min()) if rising else int(bottoms[left + 1 : right].max()) + 1
                    top = base - side if rising else base
                    inside = ink[max(0, top + 3) : top + side - 3, x + left + 4 : x + right - 3]
                    if top >= 0 and top + side <= height and inside.size and (inside > 0).mean() < 0.02:
                        cells.append((int(x + left) + 1, top, side, side))  # an empty box: not print standing on a line
    return sort_reading_order(cells)


def sort_reading_order(boxes: list[Box]) -> list[Box]:
    """Sort boxes top-down by rows (boxes whose centres share a line), then left to right."""
    rows: list[list[Box]] = []
    for box in sorted(boxes, key=lambda b: b[1] + b[3] / 2):
        cy = box[1] + box[3] / 2
        if rows:
            last = rows[-1]
            # (statistics.median: numpy's costs 20 us on a list this short, 70 times a page)
            ref_cy = median([b[1] + b[3] / 2 for b in last])
            ref_h = median([b[3] for b in last])
            if abs(cy - ref_cy) < 0.5 * ref_h:
                last.append(box)
                continue
        rows.append([box])
    return [b for row in rows for b in sorted(row, key=lambda b: b[0])]


def refine_cells(aligned: np.ndarray, cells: list[Box], dpi: float, min_overlap: float = 0.5) -> list[tuple[Box, bool]]:
    """Move each expected cell to the box found on the registered page, where one matches.

    aligned: (H, W) uint8 page registered to the template's reference.
    cells: the template's cell interiors. Returns, for each cell, (box, found): the found box
    when one overlaps the expected one by at least `min_overlap` (intersection over union) and
    has its size within 10%, else the expected box unchanged. Handwriting can split or dent a
    box's hole; such holes fail these tests and the registered position is kept.
    """
    if not cells:
        return []
    sides = [min(w, h) for _, _, w, h in cells]
    largest = max(max(w, h) for *_, w, h in cells)
    limits = BoxLimits(min_side=0.5 * min(sides) / dpi, max_side=1.5 * largest / dpi)
    # Only the field's surroundings are searched, half a box around its cells: the lines that make
    # its boxes lie there, and a page's other fields cost nothing. No farther: a box found must
    # overlap its cell by `min_overlap`, so lie within a third of its size of where registration
    # put it (a whole box around cost 0.8 ms more a page, and found the same boxes but for a
    # pixel's difference in 6 of 360 fields, the local threshold seeing less beyond the line).
    x, y, w, h = bounding_box(cells)
    reach = largest // 2
    x0, y0 = max(0, x - reach), max(0, y - reach)
    x1, y1 = min(aligned.shape[1], x + w + reach), min(aligned.shape[0], y + h + reach)
    # Lines nearly as long as a box's side: longer than most straight strokes of a digit.
    found = find_boxes(aligned[y0:y1, x0:x1], dpi, limits, min_line=max(8, int(0.8 * min(sides))))
    if not found:
        return [(c, False) for c in cells]
    found = [(x + x0, y + y0, w, h) for x, y, w, h in found]
    ious = _iou(np.array(cells, dtype=np.float64), np.array(found, dtype=np.float64))  # (cells, found)
    out = []
    for cell, row in zip(cells, ious):
        best = int(np.argmax(row))
        _, _, fw, fh = found[best]
        same_size = abs(fw - cell[2]) <= 0.1 * cell[2] and abs(fh - cell[3]) <= 0.1 * cell[3]
        out.append((found[best], True) if row[best] >= min_overlap and same_size else (cell, False))
    return out


def bounding_box(boxes: list[Box]) -> Box | None:
    """The box (x, y, w, h) around all of `boxes`; None for none."""
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    return (int(x0), int(y0), int(max(b[0] + b[2] for b in boxes) - x0), int(max(b[1] + b[3] for b in boxes) - y0))


def overlaps(a: Box, b: Box) -> bool:
    """Whether two boxes (x, y, w, h) share any pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of each box of `a` (N, 4) with each of `b` (M, 4), (x, y, w, h): (N, M)."""
    a, b = a[:, None, :], b[None, :, :]
    x0 = np.maximum(a[..., 0], b[..., 0])
    y0 = np.maximum(a[..., 1], b[..., 1])
    x1 = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
    y1 = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


# A cell's crop reaches this share of its box's size beyond the interior (ink may cross the line).
CELL_MARGIN = 0.15


def cell_crop(page: np.ndarray, box: Box, margin: float = CELL_MARGIN, like: Box | None = None) -> np.ndarray:
    """The grey crop of a cell with a margin around its interior (ink may cross the box line).

    The box's own lines then lie along the crop's edges, where segmentation removes them. With
    `like` (the template's box for this cell), the crop is as large as that box's would be,
    centred on `box`: the cells of one template size are cut to one shape, whatever size each
    box was found at, and are segmented together (segment_cells).
    """
    rows, cols = cell_window(page.shape, box, margin, like)
    return page[rows, cols]


def cell_interior(page_shape: tuple[int, int], box: Box, margin: float = CELL_MARGIN, like: Box | None = None) -> Box:
    """Where the box's interior lies in the crop `cell_crop(page, box, margin, like)` gives: (x, y, w, h)."""
    x, y, w, h = box
    rows, cols = cell_window(page_shape, box, margin, like)
    return (x - cols.start, y - rows.start, w, h)


def cell_window(page_shape: tuple[int, int], box: Box, margin: float, like: Box | None = None) -> tuple[slice, slice]:
    """The page's rows and columns of a cell's crop: its interior and `margin` of its size around
    (of the size of `like` when given, centred on the box), within a page of (H, W) `page_shape`."""
    x, y, w, h = box
    lw, lh = (w, h) if like is None else like[2:]
    width, height = lw + 2 * int(round(margin * lw)), lh + 2 * int(round(margin * lh))
    x0, y0 = x + (w - width) // 2, y + (h - height) // 2
    H, W = page_shape
    return slice(max(0, y0), min(H, y0 + height)), slice(max(0, x0), min(W, x0 + width))
