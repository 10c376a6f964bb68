"""Synthetic forms for demos, tests and benchmarks, filled with real handwritten digits.

The digits are MNIST test-split images (never seen by the model in training); the form is
drawn with OpenCV; the "scan" applies what scanners and people do to paper: rotation, shift,
scale, slight perspective, paper tone, uneven light, blur, noise and, at save time, JPEG or
bilevel compression. Everything is seeded, so the same seed gives the same pages.
Functions here return arrays; writing files is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from formreader.reading.ingest import Page
from formreader.reading.locate import Box, bounding_box
from formreader.reading.segment import SegmentParams, digit_ink
from formreader.reading.template import Field, Template

DPI = 150
PAGE_SIZE = (1240, 874)  # A5 landscape at 150 DPI, width x height
CELL = 36  # box interior, pixels
LINE = 2  # box line thickness, pixels
# The demo form's date, DDMMYYYY in its eight boxes: a day and month that exist, a year of 1900-2099.
BOXED_DATE = r"(0[1-9]|[12]\d|3[01])(0[1-9]|1[0-2])(19|20)\d\d"
# A day and a month that exist, written freely: with or without a leading zero (one group each).
DAY, MONTH = r"(0?[1-9]|[12]\d|3[01])", r"(0?[1-9]|1[0-2])"
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class FilledPage:
    image: np.ndarray  # (H, W) uint8, the filled form before scanning
    values: dict[str, str]  # field name -> digits written (ground truth)
    struck: str = ""  # the field one of whose digits the writer struck through (make_pages' `struck`)
    writer: int | str | None = None  # who wrote every digit of the page (make_pages' `writers`); None: many writers
    drawn: dict[str, list[int]] = field(default_factory=dict)  # field name -> the index in make_pages' `images` of each digit


# How a writer voids a digit: a line across it, past its ends. Left out where a digit may carry
# such a stroke by style: a 0 slashed (told from an O), a 7 or a 4 barred across.
STYLED_STROKES = {0: ("slash", "backslash"), 4: ("bar",), 7: ("bar",)}


def _separate_boxes(canvas: np.ndarray, x: int, y: int, n: int, gap: int = 8, line: int = LINE) -> list[Box]:
    cells = []
    for i in range(n):
        x0 = x + i * (CELL + 2 * line + gap)
        cv2.rectangle(canvas, (x0, y), (x0 + CELL + 2 * line - 1, y + CELL + 2 * line - 1), 0, -1)
        cv2.rectangle(canvas, (x0 + line, y + line), (x0 + line + CELL - 1, y + line + CELL - 1), 255, -1)
        cells.append((x0 + line, y + line, CELL, CELL))
    return cells


def _comb(canvas: np.ndarray, x: int, y: int, n: int, line: int = LINE) -> tuple[list[Box], int]:
    width = n * CELL + (n + 1) * line
    cv2.rectangle(canvas, (x, y), (x + width - 1, y + CELL + 2 * line - 1), 0, -1)
    cells = []
    for i in range(n):
        x0 = x + line + i * (CELL + line)
        cv2.rectangle(canvas, (x0, y + line), (x0 + CELL - 1, y + line + CELL - 1), 255, -1)
        cells.append((x0, y + line, CELL, CELL))
    return cells, x + width


def _combs(canvas: np.ndarray, x: int, y: int, groups: list[int], separator: str, line: int = LINE) -> list[Box]:
    cells: list[Box] = []
    for k, n in enumerate(groups):
        group, end = _comb(canvas, x, y, n, line)
        cells += group
        x = end
        if k < len(groups) - 1:
            cv2.putText(canvas, separator, (x + 6, y + CELL - 4), FONT, 1.0, 0, 2, cv2.LINE_AA)
            x += 26
    return cells


def blank_form(line: int = LINE) -> tuple[np.ndarray, list[Field]]:
    """The demo order form: (874, 1240) uint8 image and its fields with exact cell interiors.

    `line`: the boxes' line thickness in pixels (2 at 150 DPI; census-style forms print 3-4).
    """
    w, h = PAGE_SIZE
    canvas = np.full((h, w), 255, np.uint8)
    cv2.putText(canvas, "FORMREADER DEMO - ORDER FORM", (60, 70), cv2.FONT_HERSHEY_DUPLEX, 1.1, 0, 2, cv2.LINE_AA)
    cv2.line(canvas, (60, 92), (1180, 92), 0, 2)
    cv2.putText(canvas, "Write one digit per box, in black or blue ink.", (60, 125), FONT, 0.6, 0, 1, cv2.LINE_AA)
    rows = [170, 265, 360, 455, 550]
    labels = ["Customer no.", "Date (DD/MM/YYYY)", "Quantity", "Amount", "Phone"]
    for y, label in zip(rows, labels):
        cv2.putText(canvas, label, (60, y + 30), FONT, 0.75, 0, 2, cv2.LINE_AA)
    x0 = 340
    fields = [
        Field("customer_no", tuple(_separate_boxes(canvas, x0, rows[0], 8, line=line)), length=8),
        Field("date", tuple(_combs(canvas, x0, rows[1], [2, 2, 4], "/", line)), length=8, format="##/##/####",
              pattern=BOXED_DATE),
        Field("quantity", tuple(_separate_boxes(canvas, x0, rows[2], 4, line=line)), optional=True),
    ]
    cv2.putText(canvas, "Postal code", (700, rows[2] + 30), FONT, 0.75, 0, 2, cv2.LINE_AA)
    fields.append(Field("postal_code", tuple(_separate_boxes(canvas, 880, rows[2], 5, line=line)), length=5))
    fields.append(Field("amount", tuple(_combs(canvas, x0, rows[3], [5, 2], ".", line)), format="#####.##", numeric=True))
    fields.append(Field("phone", tuple(_combs(canvas, x0, rows[4], [3, 3, 4], "-", line)), length=10, format="###-###-####"))
    cv2.putText(canvas, "Signature", (60, 720), FONT, 0.75, 0, 2, cv2.LINE_AA)
    cv2.line(canvas, (200, 722), (700, 722), 0, 1)
    cv2.putText(canvas, "Office use only - do not write below this line", (60, 800), FONT, 0.5, 0, 1, cv2.LINE_AA)
    cv2.line(canvas, (60, 810), (1180, 810), 0, 1)
    return canvas, fields


class DigitSource:
    """Draws MNIST digits of a requested class, without repeats until a class runs out; then
    raises, or with `reuse` starts that class over in a new order."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator,
        reuse: bool = False,
        index: np.ndarray | None = None,
    ):
        missing = sorted(set(range(10)) - set(np.asarray(labels).tolist()))
        if missing:
            raise ValueError(f"no images of the digit(s) {', '.join(map(str, missing))} to write numbers with")
        self.images, self.labels = images, labels
        self.rng = rng
        self.reuse = reuse
        self.pools = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
        # With `index` (each image's number in a larger set), the numbers of the images taken, in
        # order: which digit was written where (make_pages' FilledPage.drawn).
        self.index = index
        self.taken: list[int] = []

    def take(self, digit: int) -> np.ndarray:
        pool = self.pools[digit]
        if not pool and self.reuse:
            pool += list(self.rng.permutation(np.flatnonzero(self.labels == digit)))
        if not pool:
            raise ValueError(f"no MNIST images of {digit} left")
        k = pool.pop()
        if self.index is not None:
            self.taken.append(int(self.index[k]))
        return self.images[k]


def random_values(rng: np.random.Generator) -> dict[str, str]:
    """Plausible values for the demo form's fields (quantity sometimes left empty)."""
    digits = lambda n: "".join(str(d) for d in rng.integers(0, 10, n))  # noqa: E731
    day, month, year = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(1990, 2027))
    quantity = "" if rng.random() < 0.15 else str(int(rng.integers(1, 10 ** int(rng.integers(1, 5)))))
    amount_int = str(int(rng.integers(1, 10 ** int(rng.integers(1, 6)))))
    return {
        "customer_no": digits(8),
        "date": f"{day:02d}{month:02d}{year}",
        "quantity": quantity,
        "postal_code": digits(5),
        "amount": amount_int.rjust(5) + digits(2),  # right-aligned in its five boxes
        "phone": "0" + digits(9),
    }


# How tall a digit is written, as a share of its box's interior height (drawn uniformly): inside
# the box, as the benchmarks' forms are filled; LARGE_WRITING crosses the box's lines, as many
# people write in small boxes; SMALL_WRITING keeps well inside a large one.
WRITING_SIZE = (0.6, 0.88)
LARGE_WRITING = (0.95, 1.2)
SMALL_WRITING = (0.3, 0.55)


def write_digit(
    canvas: np.ndarray,
    box: Box,
    digit: np.ndarray,
    rng: np.random.Generator,
    ink: float,
    size: tuple[float, float] = WRITING_SIZE,
) -> None:
    """Write one digit (28x28 MNIST or a glyph of any size, ink 255 on 0) into a box's interior, in
    place, `size` (a range) of its height tall."""
    x, y, w, h = box
    ys, xs = np.nonzero(digit > 30)
    glyph = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32) / 255
    target_h = h * rng.uniform(*size)
    scale = target_h / glyph.shape[0]
    glyph = cv2.resize(glyph, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    gh, gw = glyph.shape
    cx = x + w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = y + h / 2 + rng.uniform(-0.1, 0.1) * h
    x0, y0 = int(round(cx - gw / 2)), int(round(cy - gh / 2))
    H, W = canvas.shape
    sx0, sy0 = max(0, -x0), max(0, -y0)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(W, x0 + gw - sx0), min(H, y0 + gh - sy0)
    alpha = glyph[sy0 : sy0 + (y1 - y0), sx0 : sx0 + (x1 - x0)]
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = np.minimum(region, region * (1 - alpha) + ink * alpha).astype(np.uint8)


def strike_out(canvas: np.ndarray, box: Box, digit: int, rng: np.random.Generator, ink: float) -> None:
    """Strike a box's digit through as a writer voids it, in place: a stroke drawn by hand across
    the box's interior (a little bowed, as thick as a pen writing in such a box: 2-3 px in a 36-px
    box), slanting either way or level, as `digit` may not carry it by style (STYLED_STROKES)."""
    x, y, w, h = box
    kind = rng.choice([k for k in ("slash", "backslash", "bar") if k not in STYLED_STROKES.get(digit, ())])
    left, right = x + w * rng.uniform(0.05, 0.2), x + w * rng.uniform(0.8, 0.95)
    if kind == "bar":
        mid = y + h * rng.uniform(0.4, 0.6)
        ends = (mid + h * rng.uniform(-0.08, 0.08), mid + h * rng.uniform(-0.08, 0.08))
    else:
        low, high = y + h * rng.uniform(0.75, 0.95), y + h * rng.uniform(0.05, 0.25)
        ends = (low, high) if kind == "slash" else (high, low)
    t = np.linspace(0, 1, 12)
    bow = h * rng.uniform(-0.08, 0.08) * np.sin(np.pi * t)
    points = np.stack([left + (right - left) * t, ends[0] + (ends[1] - ends[0]) * t + bow], 1)
    pen_stroke(canvas, points, max(2, round(h * rng.uniform(0.055, 0.085))), ink)  # a pen's width, in proportion to the writing


def strike_square(x: int, y: int, w: int, h: int) -> Box:
    """The square a stroke across a digit written at (x, y, w, h) is drawn across where no box
    frames it (a free field): 1.3 times its height, centred on it, since such a stroke runs past
    the digit's ends."""
    side = int(1.3 * h)
    return (x + (w - side) // 2, y + (h - side) // 2, side, side)


def pen_stroke(canvas: np.ndarray, points: np.ndarray, thickness: int, ink: float) -> None:
    """Draw a stroke through `points` (K, 2) x, y in place, `thickness` px wide and anti-aliased,
    darkening the page to `ink` (grey level) where it lies."""
    mask = np.zeros(canvas.shape, np.uint8)
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, thickness, cv2.LINE_AA)
    _stamp(canvas, mask.astype(np.float32) / 255, 0, 0, ink)


def voiding_strokes(canvas: np.ndarray, box: Box, digit: int, rng: np.random.Generator, ink: float) -> None:
    """Strike a box's digit through in place, as training's struck digits are (train_struck): drawn
    apart from the benchmarks' `strike_out`, and more varied, so that the detector is measured on
    strokes it was not trained on. A slash, a backslash, a bar, two bars or a wavy bar, from
    anywhere in the box's left third to its right third or a little beyond, bowed, 4-11% of the
    box's height thick; never one that `digit` may carry by style (STYLED_STROKES). digit: -1 for
    any."""
    x, y, w, h = box
    styled = STYLED_STROKES.get(digit, ())
    kinds = [k for k in ("slash", "backslash", "bar", "bars", "wave") if k not in styled]
    kinds = [k for k in kinds if "slash" in k or "bar" not in styled]  # a 4 or a 7 barred by style: no bar of any kind
    kind = rng.choice(kinds)
    left, right = x + w * rng.uniform(-0.05, 0.3), x + w * rng.uniform(0.7, 1.05)
    if kind == "slash" or kind == "backslash":
        low, high = y + h * rng.uniform(0.6, 1.0), y + h * rng.uniform(0.0, 0.4)
        ends = [(low, high) if kind == "slash" else (high, low)]
    else:
        first = rng.uniform(0.3, 0.45 if kind == "bars" else 0.7)
        mids = [first, first + rng.uniform(0.12, 0.25)] if kind == "bars" else [first]
        ends = [(y + h * (m + rng.uniform(-0.12, 0.12)), y + h * (m + rng.uniform(-0.12, 0.12))) for m in mids]
    thickness = max(1, round(h * rng.uniform(0.04, 0.11)))
    t = np.linspace(0, 1, 16)
    for a, b in ends:
        bow = h * rng.uniform(-0.15, 0.15) * np.sin(np.pi * t)
        if kind == "wave":
            bow += h * rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * rng.uniform(1.5, 3) * t + rng.uniform(0, 2 * np.pi))
        pen_stroke(canvas, np.stack([left + (right - left) * t, a + (b - a) * t + bow], 1), thickness, ink)


def pen_or_pencil(rng: np.random.Generator) -> float:
    """The grey level of a writer's ink on white paper: a pen mostly, a pencil one time in seven."""
    return rng.uniform(15, 70) if rng.random() < 0.85 else rng.uniform(90, 130)


def struck_amounts(amounts: list, seed: int, strike=None) -> tuple[list[np.ndarray], list[Box]]:
    """Real check amounts (datasets.CheckAmount) with one digit each struck through across its box
    by `strike` (a function as strike_out; default voiding_strokes, the detector's training hand):
    their images, and the square each stroke was drawn across (strike_square)."""
    rng = np.random.default_rng([seed, 61])
    images, squares = [], []
    for a in amounts:
        square = strike_square(*a.boxes[int(rng.integers(len(a.boxes)))])
        image = a.image.copy()
        (strike or voiding_strokes)(image, square, -1, rng, pen_or_pencil(rng))
        images.append(image)
        squares.append(square)
    return images, squares


def fill_form(
    blank: np.ndarray,
    fields: list[Field],
    values: dict[str, str],
    source: DigitSource,
    rng: np.random.Generator,
    size: tuple[float, float] = WRITING_SIZE,
) -> np.ndarray:
    """Write `values` into the form's boxes with MNIST digits (`size`: write_digit's); a space
    leaves a box empty."""
    page = blank.copy()
    ink = pen_or_pencil(rng)
    for spec in fields:
        for box, ch in zip(spec.cells, values.get(spec.name, "")):
            if ch != " ":
                write_digit(page, box, source.take(int(ch)), rng, ink, size)
    return page


def scan(
    page: np.ndarray,
    rng: np.random.Generator,
    max_rotation: float = 10.0,
    upside_down: bool = False,
    dpi_scale: float = 1.0,
    with_homography: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Simulate scanning a paper page: geometry, paper tone, light, blur and noise.

    page: (H, W) uint8. Returns (H', W') uint8 at `dpi_scale` times the page's resolution, on a
    scanner bed 4% larger than the page; `with_homography`: and the (3, 3) page -> scan map.
    """
    h, w = page.shape
    out_w, out_h = int(w * 1.04 * dpi_scale), int(h * 1.04 * dpi_scale)
    paper = rng.uniform(222, 250)
    img = page.astype(np.float32) * (paper / 255)
    angle = rng.uniform(-max_rotation, max_rotation) + (180 if upside_down else 0)
    s = rng.uniform(0.92, 1.06) * dpi_scale
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)
    m[0, 2] += out_w / 2 - w / 2 + rng.uniform(-0.02, 0.02) * out_w
    m[1, 2] += out_h / 2 - h / 2 + rng.uniform(-0.02, 0.02) * out_h
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = cv2.transform(src[None], m)[0] + rng.uniform(-0.006, 0.006, (4, 2)).astype(np.float32) * [out_w, out_h]
    homography = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    img = cv2.warpPerspective(img, homography, (out_w, out_h), flags=cv2.INTER_LINEAR, borderValue=paper)
    ramp = np.linspace(rng.uniform(0.93, 1.0), 1.0, out_w, dtype=np.float32)
    img *= ramp[None, :] if rng.random() < 0.5 else ramp[::-1][None, :]
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 0.9) * dpi_scale)
    img += rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img, homography) if with_homography else img


def make_pages(
    n: int,
    seed: int,
    images: np.ndarray,
    labels: np.ndarray,
    line: int = LINE,
    worn: bool = False,
    style: str = "frames",
    size: tuple[float, float] = WRITING_SIZE,
    struck: bool = False,
    writers: np.ndarray | None = None,
) -> tuple[np.ndarray, list[Field], list[FilledPage]]:
    """The blank form, its fields, and `n` filled (unscanned) pages with their ground truth.

    images: (N, 28, 28) uint8 digits, ink high on 0 (MNIST's way), or an object array of glyphs of
    any size (`ink_on_black`, for crops of dark ink on paper). `line`: the boxes' thickness; `worn`: each page's printed lines
    broken and ragged in places (`wear_lines`), as on a copy of a copy; `style`: how the boxes
    are printed (`printed_as`); `size`: how tall the digits are written (write_digit); `struck`:
    one digit of each page struck through (`strike_out`; the pages are otherwise the same).
    `writers`: (N,) the writer of each digit: then each page is filled by one writer, as a form is,
    the writers who wrote every digit taking the pages in turn (in an order drawn from `seed`).
    """
    rng = np.random.default_rng(seed)
    strikes = np.random.default_rng([seed, 58])  # its own: the pages stay those written without
    blank, fields = blank_form(line)
    blank = printed_as(blank, fields, style, line)
    if writers is None:
        sources = [DigitSource(images, labels, rng, reuse=True, index=np.arange(len(labels)))]
    else:
        writers = np.asarray(writers)
        whole = [w for w in np.unique(writers) if len(np.unique(labels[writers == w])) == 10]
        order = rng.permutation(whole)
        sources = [
            DigitSource(images[writers == w], labels[writers == w], rng, reuse=True, index=np.flatnonzero(writers == w))
            for w in order
        ]
    pages = []
    for i in range(n):
        values = random_values(rng)
        printed = wear_lines(blank, rng) if worn else blank
        written = {k: v.replace(" ", "") for k, v in values.items()}
        writer = None if writers is None else order[i % len(order)].item()
        source = sources[i % len(sources)]
        start = len(source.taken)
        page = FilledPage(fill_form(printed, fields, values, source, rng, size), written, writer=writer)
        taken = iter(source.taken[start:])  # in fill_form's order: field by field, digit by digit
        page.drawn = {spec.name: [next(taken) for _ in written.get(spec.name, "")] for spec in fields}
        if struck:
            cells = [(spec, box, ch) for spec in fields for box, ch in zip(spec.cells, values.get(spec.name, "")) if ch != " "]
            spec, box, ch = cells[strikes.integers(len(cells))]
            strike_out(page.image, box, int(ch), strikes, pen_or_pencil(strikes))
            page.struck = spec.name
        pages.append(page)
    return blank, fields, pages


# Form styles for benchmarks and calibration: name -> (line thickness at 150 DPI, worn lines,
# bitonal 300-DPI scan, boxes drawn as short ticks rising from a base line). The first is the
# samples' form.
FORM_STYLES = {
    "samples' form": (2, False, False, "frames"),
    "thick worn borders, bitonal 300 dpi": (4, True, True, "frames"),
    "combs of short ticks": (2, False, False, "ticks"),
}
# How the boxes of a form are printed (`printed_as`). "dotted" and "dropout" were held out of the
# template detector's tuning; its first run on them found every drop-out box but 40.5% of the
# dotted combs' boxes, which were then made to count. Two more were added and held out in turn:
# ticks hanging from a top line (100% at the first run) and dashed frames (90.5% of the boxes,
# then fixed). "dropout" and "hanging ticks" are the styles never tuned on.
BOX_STYLES = ("frames", "ticks", "grey", "tinted", "dotted", "dropout", "hanging ticks", "dashed")


def printed_as(blank: np.ndarray, fields: list[Field], style: str, line: int = LINE) -> np.ndarray:
    """The form with its boxes printed in one of BOX_STYLES: full black frames (as drawn), short
    ticks on a base line (`ticked`), grey frames, frames on a tinted band, combs whose dividers
    are dotted, or frames in a drop-out colour (a light red or blue that a grey scan keeps
    faintly). blank: (H, W) uint8; returns a new image."""
    if style == "frames":
        return blank.copy()
    if style == "ticks":
        return ticked(blank, fields, line)
    if style == "hanging ticks":
        return ticked(blank, fields, line, hanging=True)
    out = blank.copy()
    for f in fields:
        if not f.cells:
            continue
        x, y, w, h = bounding_box(f.cells)
        x0, y0, x1, y1 = x - line, y - line, x + w + line, y + h + line
        frame = out[y0:y1, x0:x1]  # a view: edits go to `out`
        lines = frame < 128
        if style == "grey":
            frame[lines] = 150
        elif style == "dropout":
            frame[lines] = 205
        elif style == "tinted":
            band = out[y0 - 6 : y1 + 6, x0 - 6 : x1 + 6]
            band[band > 128] = 228
            for x, y, w, h in f.cells:
                out[y : y + h, x : x + w] = 255
        elif style == "dashed":  # every line in dashes of 4 px, gaps of 3
            frame[lines & (np.add.outer(np.arange(frame.shape[0]), np.arange(frame.shape[1])) % 7 >= 4)] = 255
        elif style == "dotted":
            for (ax, ay, aw, ah), (bx, _, _, _) in zip(f.cells, f.cells[1:]):
                if bx - (ax + aw) <= line:  # a comb's divider, not a gap between boxes
                    for k in range(ay, ay + ah, 6):
                        out[k + 3 : k + 6, ax + aw : bx] = 255
        else:
            raise ValueError(f"unknown box style {style!r}: one of {', '.join(BOX_STYLES)}")
    return out


def ticked(blank: np.ndarray, fields: list[Field], line: int = LINE, rise: float = 0.4, hanging: bool = False) -> np.ndarray:
    """The form with each box drawn as a common printed style does: a base line under the boxes
    and, between them, ticks rising `rise` of a box's height; no top line, no full sides (with
    `hanging`, upside down: a top line and ticks hanging from it).
    blank: (H, W) uint8 with the boxes as full frames; returns a new image."""
    out = blank.copy()
    for f in fields:
        for x, y, w, h in f.cells:
            erased = slice(y + int(rise * h), y + h + line) if hanging else slice(y - line, y + h - int(rise * h))
            out[erased, x - line : x + w + line] = 255
    return out


def scanned_forms(
    style: str,
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    seed: int,
    size: tuple[float, float] = WRITING_SIZE,
    struck: bool = False,
    writers: np.ndarray | None = None,
) -> tuple[Template, list]:
    """`n` scanned forms of one of FORM_STYLES filled with the given digits (ink high on 0), `size`
    of their boxes tall (write_digit): the form's template and [(Page, {field: digits written})].
    Grey scans come at 150, 200 and 300 DPI, one in seven upside down; bitonal ones at 300 DPI.
    `struck`: a digit of each page struck through (make_pages), its field's truth None: what
    was meant is not on the page, and the field is right only if it goes to review. `writers`:
    each digit's writer, for pages filled by one writer each (make_pages)."""
    template, pages = written_forms(style, images, labels, n, seed, size=size, struck=struck, writers=writers)
    scans = scanned_as(style, pages, seed)
    return template, [(page, {**p.values, **({p.struck: None} if p.struck else {})}) for page, p in zip(scans, pages)]


def written_forms(
    style: str, images: np.ndarray, labels: np.ndarray, n: int, seed: int, **written
) -> tuple[Template, list[FilledPage]]:
    """`n` forms of one of FORM_STYLES filled with the given digits, not yet scanned: the form's
    template and the pages (make_pages, `written` its keywords)."""
    line, worn, _, boxes = FORM_STYLES[style]
    blank, fields, pages = make_pages(n, seed, images, labels, line=line, worn=worn, style=boxes, **written)
    return Template(style, blank, float(DPI), tuple(fields)), pages


def scanned_as(style: str, pages: list[FilledPage], seed: int) -> list[Page]:
    """Filled pages scanned as forms of `style` are (scanned_forms)."""
    bitonal_scan = FORM_STYLES[style][2]
    rng = np.random.default_rng(seed)
    scans = []
    for i, p in enumerate(pages):
        factor = 2.0 if bitonal_scan else [1.0, 4 / 3, 2.0][i % 3]
        image = scan(p.image, rng, upside_down=i % 7 == 3, dpi_scale=factor)
        if bitonal_scan:
            image = bitonal(image, rng)
        scans.append(Page(image, DPI * factor, f"{style}-{i}", 1))
    return scans


# How ink_on_black finds a real crop's ink: the segmentation's ink thresholds spelled out as they
# were when the form and check benchmarks began, so that tuning how formreader reads cannot change
# what it is measured on. (At stop 39 a lower `seed_limit` seemed to read CVL's writers' forms
# 3 points better; it had written their digits into the forms with fuller strokes.)
GLYPH_PARAMS = SegmentParams(
    min_contrast=15.0, noise_contrast=6.0, seed_depth=0.5, grow_depth=0.25, seed_limit=60.0, tight_side=0, small_side=0
)  # tight_side and small_side 0: each glyph at its crop's own resolution, as before stops 39 and 57 read small digits larger


def ink_on_black(crops, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real digit crops (dark ink on light paper, any size) as digits to write into forms: an
    object array (N,) of (h, w) uint8 glyphs, ink high on 0, each at its crop's own resolution
    and cut to its ink, and their labels. Each crop goes through formreader's own segmentation
    first, so that the specks, dots and pieces of box line that real crops carry are not
    written into a form as ink; crops judged blank are left out. (Not the 28x28 normalised
    digit: written into a form from that, a digit would be resampled, thickened and centred
    twice, and lose the detail a writer's own ink has.)"""
    glyphs, index = glyphs_of(crops)
    return glyphs, np.asarray(labels)[index]


def glyphs_of(crops) -> tuple[np.ndarray, np.ndarray]:
    """`ink_on_black`'s glyphs of real crops (an object array (M,)), and the index (M,) of the crop
    each came from (a crop judged blank gives none)."""
    glyphs, index = [], []
    for i, crop in enumerate(crops):
        ink, _ = digit_ink(np.asarray(crop), GLYPH_PARAMS)
        if ink is None:
            continue
        ys, xs = np.nonzero(ink > 0.05)
        glyphs.append(np.round(255 * ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]).astype(np.uint8))
        index.append(i)
    out = np.empty(len(glyphs), object)
    out[:] = glyphs
    return out, np.asarray(index, np.int64)


def writer_glyphs(crops, labels: np.ndarray, writers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`ink_on_black` of real crops, with each glyph's writer: (glyphs, labels, writers)."""
    crops, labels, writers = np.asarray(crops), np.asarray(labels), np.asarray(writers)
    parts = [(*ink_on_black(crops[writers == w], labels[writers == w]), w) for w in np.unique(writers)]
    glyphs = np.empty(sum(len(g) for g, _, _ in parts), object)
    glyphs[:] = [g for part, _, _ in parts for g in part]
    return glyphs, np.concatenate([y for _, y, _ in parts]), np.concatenate([np.full(len(y), w) for _, y, w in parts])


def wear_lines(blank: np.ndarray, rng: np.random.Generator, breaks: float = 0.12) -> np.ndarray:
    """The printed form with gaps and ragged edges in its lines: (H, W) uint8 -> (H, W) uint8.

    Blotches of a smooth random field (about a line's width across) punch `breaks` of the
    printed ink out; its edges are eaten by a finer one.
    """
    h, w = blank.shape
    coarse = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 3.0)
    fine = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 0.8)
    holes = coarse > np.quantile(coarse, 1 - breaks)
    edge = (fine > np.quantile(fine, 0.7)) & (cv2.erode((blank < 128).astype(np.uint8), np.ones((3, 3), np.uint8)) == 0)
    out = blank.copy()
    out[(holes | edge) & (blank < 128)] = 255
    return out


def bitonal(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey scan (H, W) uint8 as a bitonal scanner writes it: 0 or 255 at a fixed threshold
    (somewhat off the middle, as scanners are set), its grey edges becoming ragged."""
    threshold = rng.uniform(0.55, 0.7) * 255
    return np.where(image < threshold, 0, 255).astype(np.uint8)


# A fax machine's two modes: 204 dots an inch across the line, 98 lines an inch down ("standard")
# or 196 ("fine"); each dot black or white at one threshold.
FAX_MODES = {"standard": (204, 98), "fine": (204, 196)}


def as_fax(image: np.ndarray, dpi: float, mode: str = "standard") -> tuple[np.ndarray, tuple[int, int]]:
    """A grey page (H, W) uint8 scanned at `dpi` as a fax machine sends it: resampled to the mode's
    resolution across and down (pixels not square in standard mode), then black or white at one
    threshold (160 of 255, as light pencil is lost). Returns (page (H', W') uint8 0 or 255, its (dpi across, dpi down)), as a
    TIFF stores it."""
    across, down = FAX_MODES[mode]
    h, w = image.shape
    size = (round(w * across / dpi), round(h * down / dpi))
    resampled = cv2.resize(image, size, interpolation=cv2.INTER_AREA if down < dpi else cv2.INTER_LINEAR)
    return np.where(resampled < 160, 0, 255).astype(np.uint8), (across, down)


# ---------------------------------------------------------------------------------------------
# Bank checks: numbers written freely, on patterned paper
# ---------------------------------------------------------------------------------------------

CHECK_SIZE = (1050, 480)  # 7 x 3.2 inches at 150 DPI
AMOUNT_BOX = (742, 128, 268, 66)  # interior of the courtesy amount box
DATE_BOX = (742, 40, 268, 58)  # the date is written on a guide line, with no box
# A check's date: day, month, then the year in two digits or as 19xx/20xx, one separator
# throughout ('1.6.22', '01-02-2021').
DATE_PATTERN = rf"{DAY}([/.-]){MONTH}\2(\d\d|(19|20)\d\d)"
AMOUNT_PATTERN = r"(\d{1,3}(,\d{3})+|\d+)\.\d{2}"


def blank_check() -> tuple[np.ndarray, list[Field]]:
    """A blank bank check on a light wavy security pattern, and its two free fields."""
    w, h = CHECK_SIZE
    canvas = np.full((h, w), 255, np.uint8)
    xs = np.arange(0, w, 3)
    for y in range(-10, h + 10, 7):  # guilloche-like security pattern
        ys = y + 3 * np.sin(xs / 14.0 + y / 37.0)
        pts = np.stack([xs, ys], 1).astype(np.int32)
        cv2.polylines(canvas, [pts], False, 212, 1, cv2.LINE_AA)
    cv2.putText(canvas, "FORMREADER SAVINGS BANK", (40, 60), cv2.FONT_HERSHEY_DUPLEX, 0.9, 0, 2, cv2.LINE_AA)
    cv2.putText(canvas, "12 Example Street, Springfield", (40, 88), FONT, 0.5, 0, 1, cv2.LINE_AA)
    cv2.putText(canvas, "DATE", (660, 90), FONT, 0.6, 0, 2, cv2.LINE_AA)
    x, y, bw, bh = DATE_BOX
    cv2.line(canvas, (x, y + bh - 6), (x + bw, y + bh - 6), 0, 1)  # guide line to write on
    cv2.putText(canvas, "PAY TO THE", (40, 150), FONT, 0.55, 0, 1, cv2.LINE_AA)
    cv2.putText(canvas, "ORDER OF", (40, 172), FONT, 0.55, 0, 1, cv2.LINE_AA)
    cv2.line(canvas, (150, 175), (700, 175), 0, 1)
    cv2.putText(canvas, "$", (712, 175), cv2.FONT_HERSHEY_DUPLEX, 1.2, 0, 2, cv2.LINE_AA)
    x, y, bw, bh = AMOUNT_BOX
    cv2.rectangle(canvas, (x - 2, y - 2), (x + bw + 1, y + bh + 1), 0, 2)
    cv2.line(canvas, (40, 245), (900, 245), 0, 1)
    cv2.putText(canvas, "DOLLARS", (910, 245), FONT, 0.55, 0, 1, cv2.LINE_AA)
    cv2.putText(canvas, "MEMO", (40, 330), FONT, 0.55, 0, 1, cv2.LINE_AA)
    cv2.line(canvas, (100, 332), (460, 332), 0, 1)
    cv2.line(canvas, (600, 332), (1000, 332), 0, 1)
    cv2.putText(canvas, "A021000089A 4410 2265 0C 0318", (120, 420), cv2.FONT_HERSHEY_PLAIN, 1.6, 0, 2, cv2.LINE_AA)
    fields = [
        # Day, month, year with one kind of separator; dollars (thousands grouped or not) and cents.
        Field("date", kind="free", box=DATE_BOX, min_length=4, max_length=8, separators="/.-", pattern=DATE_PATTERN),
        Field("amount", kind="free", box=AMOUNT_BOX, min_length=3, max_length=9, separators=".,", pattern=AMOUNT_PATTERN),
    ]
    return canvas, fields


def _glyph(digit: np.ndarray, height: float, rng: np.random.Generator, broken: bool, squeeze: float = 1.0) -> np.ndarray:
    """A digit (as `write_digit` takes it) cropped to its ink and scaled to `height` px, its width
    `squeeze` times as wide; alpha (h, w) float32."""
    ys, xs = np.nonzero(digit > 30)
    g = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32) / 255
    scale = height / g.shape[0]
    g = cv2.resize(g, (max(1, round(g.shape[1] * scale * squeeze)), max(1, round(height))), interpolation=cv2.INTER_LINEAR)
    if broken and g.shape[0] > 12:  # a pen skip: a thin gap across the strokes
        y = int(rng.integers(int(0.2 * g.shape[0]), int(0.45 * g.shape[0])))
        g[y : y + 2] = 0
    return g


def _stamp(canvas: np.ndarray, alpha: np.ndarray, x: int, y: int, ink: float) -> None:
    h, w = alpha.shape
    H, W = canvas.shape
    x1, y1 = min(W, x + w), min(H, y + h)
    if x1 <= x or y1 <= y:
        return
    a = alpha[: y1 - y, : x1 - x]
    region = canvas[y:y1, x:x1].astype(np.float32)
    canvas[y:y1, x:x1] = np.minimum(region, region * (1 - a) + ink * a).astype(np.uint8)


def write_number(
    canvas: np.ndarray,
    box: Box,
    raw: str,
    source: DigitSource,
    rng: np.random.Generator,
    ink: float,
    touching: float = 0.3,
    broken: float = 1 / 7,
    narrow: float = 0.0,
) -> list[tuple[int, int, int, np.ndarray]]:
    """Write `raw` (digits and . , - / separators) freely into a box, in place.

    Digits vary in size and spacing; with probability `touching` a digit is pushed into its
    left neighbour until their ink touches or overlaps; with probability `broken` a digit has a
    broken stroke (a pen skip); with probability `narrow` it is written 0.5-0.8 as wide (writers
    who write narrow: a 7 whose bar is a short hook). Returns where each digit went: (digit, x, y, alpha), alpha (h, w)
    float32 placed with its top left corner at canvas pixel (x, y).
    """
    placed = []
    x, y, w, h = box
    digits = sum(c.isdigit() for c in raw)
    fit = (w - 30) / (1.15 * digits + 0.75 * (len(raw) - digits))  # the height at which it fits
    height = min(h * rng.uniform(0.5, 0.68), fit)
    baseline = y + h * rng.uniform(0.78, 0.88)
    cx = x + rng.uniform(6, 24)
    previous, previous_width = "", 0
    for ch in raw:
        jitter = rng.uniform(-0.04, 0.04) * height
        if ch.isdigit():
            squeeze = rng.uniform(0.5, 0.8) if narrow and rng.random() < narrow else 1.0
            g = _glyph(source.take(int(ch)), height * rng.uniform(0.92, 1.08), rng, rng.random() < broken, squeeze)
            push = previous.isdigit() and rng.random() < touching
            # Touching: pushed back by up to a sixth of the narrower digit, so strokes meet or
            # overlap a little, as in real writing (not one digit written over the other).
            gap = -rng.uniform(0.0, 0.16) * min(g.shape[1], previous_width) if push else rng.uniform(0.05, 0.3) * height
            left = int(round(cx + gap))
            previous, previous_width = ch, g.shape[1]
            top = int(round(baseline - g.shape[0] + jitter))
            _stamp(canvas, g, max(left, x), top, ink)
            placed.append((int(ch), max(left, x), top, g))
            cx = max(left, x) + g.shape[1]
            continue
        s = max(2, int(round(height * 0.08)))
        previous = ch
        cx += 0.18 * height
        layer = np.zeros_like(canvas, dtype=np.float32)
        if ch == ".":
            cv2.circle(layer, (int(cx + s), int(baseline - s)), s, 1.0, -1, cv2.LINE_AA)
            cx += 2.5 * s
        elif ch == ",":
            cv2.line(layer, (int(cx + 2 * s), int(baseline - s)), (int(cx), int(baseline + 2.5 * s)), 1.0, s + 1, cv2.LINE_AA)
            cx += 3 * s
        elif ch == "-":
            cv2.line(
                layer,
                (int(cx), int(baseline - height / 2)),
                (int(cx + 0.4 * height), int(baseline - height / 2)),
                1.0,
                s,
                cv2.LINE_AA,
            )
            cx += 0.45 * height
        elif ch == "/":
            top = baseline - 1.05 * height
            cv2.line(layer, (int(cx), int(baseline + 0.05 * height)), (int(cx + 0.7 * height), int(top)), 1.0, s, cv2.LINE_AA)
            cx += 0.75 * height
        cx += 0.18 * height
        _stamp(canvas, layer, 0, 0, ink)
    return placed


def random_check_values(rng: np.random.Generator) -> dict[str, str]:
    """A date and an amount as people write them on checks (raw, with separators)."""
    day, month, year = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(2020, 2027))
    sep = str(rng.choice(["/", ".", "-"]))
    date = f"{day:02d}{sep}{month:02d}{sep}{year}" if rng.random() < 0.6 else f"{day}{sep}{month}{sep}{year % 100:02d}"
    units = int(rng.integers(1, 10 ** int(rng.integers(1, 6))))
    whole = f"{units:,}" if rng.random() < 0.6 else str(units)
    amount = whole + "." + f"{int(rng.integers(0, 100)):02d}"
    return {"date": date, "amount": amount}


def make_checks(
    n: int, seed: int, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[Field], list[tuple[np.ndarray, dict[str, str]]]]:
    """The blank check, its fields and `n` filled checks with their raw values (ground truth).
    Digits repeat only once a class's images are used up (more checks than MNIST's test split fills)."""
    rng = np.random.default_rng(seed)
    blank, fields = blank_check()
    source = DigitSource(images, labels, rng, reuse=True)
    checks = []
    for _ in range(n):
        values = random_check_values(rng)
        page = blank.copy()
        ink = rng.uniform(15, 80)
        for spec in fields:
            write_number(page, spec.box, values[spec.name], source, rng, ink)
        checks.append((page, values))
    return blank, fields, checks


# ---------------------------------------------------------------------------------------------
# Forms with free fields: a number written in one box
# ---------------------------------------------------------------------------------------------

FREE_FIELDS = (  # name, box (x, y, w, h) at 150 DPI, what is written there
    ("amount", (330, 150, 300, 70), "amount"),
    ("quantity", (820, 150, 180, 70), "count"),
    ("account", (330, 290, 420, 70), "digits"),
    ("date", (820, 290, 300, 70), "date"),
    ("reference", (330, 430, 420, 70), "digits"),
    ("total", (820, 430, 300, 70), "amount"),
)


def free_form(line: int = 4) -> tuple[np.ndarray, list[Field]]:
    """A census-style form of free fields: each a box (borders `line` px thick) in which a number
    is written with no cells. Returns the blank (874, 1240) uint8 and its fields."""
    w, h = PAGE_SIZE
    canvas = np.full((h, w), 255, np.uint8)
    cv2.putText(canvas, "FORMREADER DEMO - RETURN", (60, 70), cv2.FONT_HERSHEY_DUPLEX, 1.1, 0, 2, cv2.LINE_AA)
    cv2.line(canvas, (60, 92), (1180, 92), 0, 2)
    fields = []
    for name, (x, y, bw, bh), kind in FREE_FIELDS:
        cv2.putText(canvas, name.capitalize(), (x, y - 14), FONT, 0.7, 0, 2, cv2.LINE_AA)
        cv2.rectangle(canvas, (x - line, y - line), (x + bw + line - 1, y + bh + line - 1), 0, line)
        rules = {"amount": (".,", r"\d+\.\d{2}"), "date": ("/", rf"{DAY}/{MONTH}/(19|20)\d\d")}
        separators, pattern = rules.get(kind, ("", ""))
        fields.append(Field(name, kind="free", box=(x, y, bw, bh), min_length=1, separators=separators, pattern=pattern))
    cv2.putText(canvas, "Write each number inside its box.", (60, 720), FONT, 0.6, 0, 1, cv2.LINE_AA)
    return canvas, fields


def free_values(rng: np.random.Generator) -> dict[str, str]:
    """What people write in free_form's fields (raw, with separators)."""
    digits = lambda n: "".join(str(d) for d in rng.integers(0, 10, n))  # noqa: E731
    out = {}
    for name, _, kind in FREE_FIELDS:
        if kind == "amount":
            out[name] = f"{int(rng.integers(1, 10 ** int(rng.integers(1, 5))))}.{int(rng.integers(0, 100)):02d}"
        elif kind == "count":
            out[name] = str(int(rng.integers(1, 10 ** int(rng.integers(1, 4)))))
        elif kind == "date":
            out[name] = f"{int(rng.integers(1, 29))}/{int(rng.integers(1, 13))}/{int(rng.integers(1990, 2027))}"
        else:
            out[name] = digits(int(rng.integers(5, 9)))
    return out


def scanned_free_forms(
    images: np.ndarray, labels: np.ndarray, n: int, seed: int, struck: bool = False, strike=strike_out
) -> tuple[Template, list]:
    """`n` free-field forms filled with the given digits (ink high on 0), worn and scanned
    bitonal at 300 DPI: the template and [(Page, {field: digits written})]. `struck`: a digit of
    one field a page struck through (by `strike`, a function as `strike_out`, across the digit's
    `strike_square`), that field's truth None (right only if it goes to
    review); the pages are otherwise the same."""
    rng = np.random.default_rng(seed)
    strikes = np.random.default_rng([seed, 58])
    blank, fields = free_form()
    source = DigitSource(images, labels, rng, reuse=True)
    items = []
    for i in range(n):
        values = free_values(rng)
        page = wear_lines(blank, rng)
        ink = rng.uniform(15, 70)
        voided = fields[strikes.integers(len(fields))].name if struck else ""
        for spec in fields:
            placed = write_number(page, spec.box, values[spec.name], source, rng, ink, touching=0.2, broken=0.1)
            if spec.name == voided:
                digit, x, y, glyph = placed[strikes.integers(len(placed))]
                strike(page, strike_square(x, y, glyph.shape[1], glyph.shape[0]), digit, strikes, ink)
        image = bitonal(scan(page, rng, max_rotation=5, dpi_scale=2.0), rng)
        truth = {k: "".join(c for c in v if c.isdigit()) for k, v in values.items()}
        items.append((Page(image, DPI * 2.0, f"free-{i}", 1), {**truth, **({voided: None} if voided else {})}))
    return Template("free_form", blank, float(DPI), tuple(fields)), items


def invoice_form() -> np.ndarray:
    """A form none of the others is: an invoice with a table and other words, no digit boxes
    (874, 1240) uint8, for the pages of an unknown form in tests and benchmarks."""
    page = np.full((874, 1240), 255, np.uint8)
    cv2.putText(page, "ACME SUPPLIES LTD - INVOICE", (80, 90), cv2.FONT_HERSHEY_COMPLEX, 1.2, 0, 2, cv2.LINE_AA)
    for i, word in enumerate(["Item", "Description", "Unit price", "Total"]):
        cv2.putText(page, word, (100 + i * 260, 200), cv2.FONT_HERSHEY_PLAIN, 1.6, 0, 2, cv2.LINE_AA)
    for y in range(220, 760, 45):
        cv2.line(page, (80, y), (1160, y), 0, 1)
    for x in (80, 340, 600, 860, 1160):
        cv2.line(page, (x, 220), (x, 760), 0, 1)
    cv2.putText(page, "Thank you for your business. Payment due in 30 days.", (80, 820), cv2.FONT_HERSHEY_PLAIN, 1.4, 0, 1)
    return page
