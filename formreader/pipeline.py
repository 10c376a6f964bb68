"""The orchestrator: pages -> registered -> cells located -> digits segmented -> classified -> fields.

`read_page` is a pure function of a page, a template and a classifier, so the same code runs
in a loop, a process pool or on a cluster. `process_paths` runs a batch: it reads files in a
stable order, has each page read whole (rendered, registered, segmented, classified, decided)
by a worker process or a cluster's worker if asked, and records every page as soon as it is
read, in order, so an interrupted run keeps what it finished (see `Journal`).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import json
import multiprocessing
import os
import pickle
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np

from formreader.export import journal_lines, journal_settings, view_name, write_atomically
from formreader.reading.classify import (
    NUM_CLASSES,
    DigitClassifier,
    DigitReading,
    StrikeDetector,
    label_of,
    reading_from_probabilities,
    single_threaded,
)
from formreader.reading.fields import (
    DEFAULT_REVIEW_THRESHOLD,
    FieldReading,
    read_field,
    read_free_field,
    unread_cell,
)
from formreader.reading.ingest import (
    MAX_PAGE_PIXELS,
    ImageFrame,
    Page,
    PageError,
    PdfPage,
    carried,
    find_inputs,
    is_bitonal,
    is_dithered,
    load_page,
    read_pages,
    without_dither_dots,
)
from formreader.reading.locate import Box, cell_crop, cell_interior, refine_cells
from formreader.reading.register import ReferenceFeatures, Registration, RegistrationError, prepare_reference, register_page
from formreader.reading.segment import DigitSegment, ink_beyond_boxes, segment_cells
from formreader.reading.string_model import StringModel, field_views
from formreader.reading.strings import (
    StringLayout,
    StringReading,
    decide_string,
    digit_views,
    field_image,
    segment_string,
    without_frame,
)
from formreader.reading.template import Field, Template

VIEW_QUALITY = 80  # JPEG quality of the page pictures kept for review: digits stay legible at a tenth of the size
# glibc's mallopt parameters (malloc.h), and what a worker sets them to: buffers up to 64 MiB come
# from its heap, and up to 256 MiB freed at the heap's top stay there for the next page.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_KEPT = 64 << 20, 256 << 20


@dataclass
class SegmentedPage:
    """A page after the image stages: what the classifier and the field rules need."""

    source: str
    page: int
    registration: Registration
    boxes: list[list[Box]]  # per field, per cell: located interiors, reference pixels (free field: its box)
    segments: list[list[DigitSegment] | StringLayout]  # per field: per cell, or a free field's layout
    offsets: list[tuple[int, int]]  # per field: where its crop starts on the page (free fields)
    # per field: a free field's inputs to the string model, one per view (V, 32, 256), and its crop's (H, W); else None
    wholes: list[tuple[np.ndarray, tuple[int, int]] | None] = field(default_factory=list)
    template: str = ""  # the name of the form it was read as
    bitonal: bool = False  # a bitonal scan (ingest.is_bitonal): its field confidence is calibrated apart
    dpi: float = 0.0  # the resolution it was scanned at, as registered (scanned_dpi); 0: not known


@dataclass
class PageRead:
    """The outcome for one page: its fields, or the reason it could not be read."""

    source: str
    page: int
    fields: list[FieldReading] = field(default_factory=list)
    quality: float = 0.0
    rotation_deg: float = 0.0
    error: str | None = None
    boxes: list[list[Box]] = field(default_factory=list)
    template: str = ""  # the name of the form it was read as


def scale_to_template(image: np.ndarray, dpi: float | None, template: Template) -> np.ndarray:
    """Resample a page to the template's resolution when its own is known (or it is far larger).
    Raises RegistrationError when that would make it larger than MAX_PAGE_PIXELS."""
    factor = _resample_factor(image.shape, dpi, template)
    if factor == 1.0:
        return image
    if image.size * factor**2 > MAX_PAGE_PIXELS:
        raise RegistrationError(
            f"page of {image.shape[1]}x{image.shape[0]} px at {dpi:g} DPI would be {image.size * factor**2 / 1e6:.0f} "
            f"megapixels at the template's {template.dpi:g} DPI (limit {MAX_PAGE_PIXELS / 1e6:.0f}): is its DPI right?"
        )
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=interp)


def _resample_factor(shape: tuple[int, ...], dpi: float | None, template: Template) -> float:
    """How much scale_to_template resizes a page of this (H, W) shape and DPI (1.0: not at all)."""
    factor = template.dpi / dpi if dpi else min(1.0, 1.5 * max(template.reference.shape) / max(shape))
    return 1.0 if abs(factor - 1) < 0.03 else factor


def scanned_dpi(page: Page, registration: Registration, template: Template) -> float:
    """The resolution the page was scanned at, in the template's DPI as the registration found
    it: a file's DPI is often missing or wrong, the form's printed size on the page is not."""
    scale = _resample_factor(page.image.shape, page.dpi, template)
    scale *= float(np.sqrt(abs(np.linalg.det(registration.homography[:2, :2]))))  # page px -> reference px
    return template.dpi / scale


# A page scanned coarser than this share of the template's resolution is read, but every field
# goes to review saying so: registration is made for a factor of 2 at most, and a digit a few
# pixels high is guessed at (a page at a third of its 200 DPI read most values right, yet its
# fields were flagged for reasons that pointed at the writing, not at the scan).
LOW_RESOLUTION = 0.5


MATCH_MARGIN = 0.15  # of the forms' print found: how much better the chosen form must fit than the next


def match_form(
    page: Page, templates: Sequence[Template], features: Sequence[ReferenceFeatures]
) -> tuple[Template, Registration]:
    """Which of several forms a page is: registered to each, the one whose printed lines it shows
    best, by MATCH_MARGIN over the next. Raises RegistrationError when none fits (or two fit
    alike: versions of one form that a page cannot tell apart)."""
    fits: list[tuple[float, int, Registration | None]] = []
    for i, (template, feats) in enumerate(zip(templates, features)):
        try:
            reg = register_page(scale_to_template(page.image, page.dpi, template), template.reference, feats)
            fits.append((reg.quality, i, reg))
        except RegistrationError as e:
            fits.append((e.quality, i, None))
    fits.sort(key=lambda f: -f[0])
    (best, i, reg), (second, j, _) = fits[0], fits[1] if len(fits) > 1 else (0.0, -1, None)
    if reg is None:
        raise RegistrationError(
            f"page matches no template: at best {best:.0%} of the printed lines of '{templates[i].name}' found", best
        )
    if best - second < MATCH_MARGIN:
        raise RegistrationError(
            f"page matches two templates alike: '{templates[i].name}' ({best:.0%} of its printed lines found) "
            f"and '{templates[j].name}' ({second:.0%})", best
        )
    return templates[i], reg


def segment_page(
    page: Page, template: Template | Sequence[Template], features: ReferenceFeatures | Sequence | None = None
) -> SegmentedPage:
    """Register a page, locate its cells and segment every digit. Raises RegistrationError.

    With several templates (and their features, in the same order) the page is read as the form
    it matches (`match_form`); the result names it."""
    bitonal = is_bitonal(page.image)
    if bitonal and is_dithered(page.image):  # a halftone scan's dots are no ink
        page = replace(page, image=without_dither_dots(page.image, page.dpi))
    if isinstance(template, Template):
        features = features or prepare_reference(template.reference)
        image = scale_to_template(page.image, page.dpi, template)
        reg = register_page(image, template.reference, features)
    else:
        forms = list(zip(template, features or [prepare_reference(t.reference) for t in template]))
        template, reg = match_form(page, [t for t, _ in forms], [f for _, f in forms])
        features = next(f for t, f in forms if t is template)
    boxes: list[list[Box]] = []
    segments: list[list[DigitSegment] | StringLayout] = []
    offsets: list[tuple[int, int]] = []
    wholes: list[tuple[np.ndarray, tuple[int, int]] | None] = []
    for spec in template.fields:
        if spec.kind == "free":
            crop, offset = free_field_window(reg.aligned, spec.box)
            boxes.append([spec.box])
            segments.append(segment_string(crop))
            offsets.append(offset)
            wholes.append((field_views(crop), crop.shape))
            continue
        wholes.append(None)
        boxes.append([box for box, _ in refine_cells(reg.aligned, list(spec.cells), template.dpi)])
        segments.append([])  # the page's cells are segmented together, below
        offsets.append((0, 0))
    # The blank form's own print is dropped from each cell first: ticks, dividers and borders of
    # any style are never read as strokes, wherever the template puts the box.
    boxed = [k for k, spec in enumerate(template.fields) if spec.kind != "free"]
    cells = [b for k in boxed for b in boxes[k]]
    # Each cut as large as its template box is (a box found a pixel larger or smaller is centred
    # in it): the cells of a form of one box size are segmented as one stack, not one per size
    # found (segmenting a page's 42 cells took 6.7 ms against 9.5-10 in 3-7 stacks); so are the
    # bands above and below them measured for writing beyond the boxes (2.9 -> 2.1 ms a page).
    likes = [c for k in boxed for c in template.fields[k].cells]
    done = iter(segment_cells(
        [cell_crop(reg.aligned, b, like=c) for b, c in zip(cells, likes)],
        interiors=[cell_interior(reg.aligned.shape, b, like=c) for b, c in zip(cells, likes)],
        printed=[cell_crop(features.printed, b, like=c) for b, c in zip(cells, likes)],
    ))
    beyond = iter(ink_beyond_boxes(
        reg.aligned, features.printed, cells, keep_out=[spec.box for spec in template.fields if spec.kind == "free"], likes=likes
    ))
    for k in boxed:
        segments[k] = [next(done) for _ in boxes[k]]
        for cell in segments[k]:
            cell.beyond = float(next(beyond))
    return SegmentedPage(
        page.source, page.page, reg, boxes, segments, offsets, wholes, template=template.name,
        bitonal=bitonal, dpi=scanned_dpi(page, reg, template),
    )


def free_field_window(page: np.ndarray, box: Box) -> tuple[np.ndarray, tuple[int, int]]:
    """A free field as both readers take it: its crop (`free_field_crop`), the box's border
    painted out (`strings.without_frame`), then `strings.field_image` (cut to the writing where
    that is small in the box, paper added where it touches the crop's edge); and the image's
    corner on the page."""
    crop, (x0, y0) = free_field_crop(page, box)
    x, y, w, h = box
    image, (dx, dy) = field_image(without_frame(crop, (x - x0, y - y0, w, h)))
    return image, (x0 + dx, y0 + dy)


def free_field_crop(page: np.ndarray, box: Box, margin: int = 4) -> tuple[np.ndarray, tuple[int, int]]:
    """A free field's crop, its border included (segmentation removes it), and its corner."""
    x, y, w, h = box
    H, W = page.shape
    x0, y0 = max(0, x - margin), max(0, y - margin)
    return page[y0 : min(H, y + h + margin), x0 : min(W, x + w + margin)], (x0, y0)


def decide_page(
    seg: SegmentedPage,
    probabilities: np.ndarray,
    template: Template,
    threshold: float = DEFAULT_REVIEW_THRESHOLD,
    field_power: float = 1.0,
    sequences: list[np.ndarray] | None = None,
    string_model: StringModel | None = None,
    boxed_threshold: float | None = None,
    detector: StrikeDetector | None = None,
) -> PageRead:
    """Turn a segmented page and the probabilities of its digits (in cell order) into fields.

    threshold: the review threshold of free fields, and of boxed ones unless `boxed_threshold` is
    given (DigitClassifier.review_threshold). field_power: the model's calibration of boxed fields'
    confidence for this page's kind of scan (DigitClassifier.field_power).
    sequences, string_model: the string model's step probabilities (V, 64, 15) for each free field's views
    in order, and the model (its card decides), when there is one: a free field is then read by both
    readers (StringModel.decide). detector: the struck-digit detector: a boxed cell whose `struck`
    score (mark_struck) reaches its threshold was struck through, and a free field's digits are
    scored here (struck_digits); None: no digit is held struck."""
    start = 0
    fields = []
    wholes = iter(sequences or [])
    for spec, cells, offset, whole in zip(template.fields, seg.segments, seg.offsets, seg.wholes or [None] * len(seg.offsets)):
        if isinstance(cells, StringLayout):
            probs = probabilities[start : start + len(cells.images)]
            start += len(cells.images)
            steps, shape = (next(wholes), whole[1]) if sequences is not None and whole is not None else (None, None)
            _, decided = decide_free(
                cells, probs, steps, shape, spec, string_model, detector, template.document, threshold, offset
            )
            fields.append(decided)
            continue
        readings = []
        for s in cells:
            if s.image is not None:
                readings.append(reading_from_probabilities(probabilities[start]))
                start += 1
            else:
                readings.append(unread_cell(s.stray_ink))
        struck = [] if detector is None else [s.image is not None and s.struck >= detector.threshold for s in cells]
        boxed = threshold if boxed_threshold is None else boxed_threshold
        fields.append(read_field(spec, readings, boxed, field_power, [s.beyond for s in cells], struck))
    if 0 < seg.dpi < LOW_RESOLUTION * template.dpi:
        coarse = f"scanned at about {seg.dpi:.0f} DPI, under half the template's {template.dpi:g}: scan it finer"
        for f in fields:
            f.status, f.reasons = "review", [coarse, *f.reasons]
    reg = seg.registration
    return PageRead(seg.source, seg.page, fields, reg.quality, reg.rotation_deg, None, seg.boxes, template.name)


def digit_images(seg: SegmentedPage) -> tuple[np.ndarray, np.ndarray]:
    """The page's digit images as one (N, 28, 28) array, in field and cell order, blanks skipped
    (a free field contributes every candidate piece of its layout); and (N,) bool: a piece."""
    images: list[np.ndarray] = []
    pieces: list[bool] = []
    for cells in seg.segments:
        found = list(cells.images) if isinstance(cells, StringLayout) else [s.image for s in cells if s.image is not None]
        images += found
        pieces += [isinstance(cells, StringLayout)] * len(found)
    return (np.stack(images) if images else np.zeros((0, 28, 28), np.float32)), np.array(pieces, bool)


def page_probabilities(seg: SegmentedPage, classifier: DigitClassifier) -> np.ndarray:
    """(N, 11) probabilities of the page's digit_images: boxed cells by the digit model and its
    companion (DigitClassifier.cell_probabilities), the pieces of free fields by the model that
    also refuses wrong cuts."""
    images, piece = digit_images(seg)
    probs = np.zeros((len(images), NUM_CLASSES), np.float32)
    if (~piece).any():
        probs[~piece] = classifier.cell_probabilities(images[~piece])
    if piece.any():
        probs[piece] = classifier.for_strings.probabilities(images[piece])
    return probs


def mark_struck(seg: SegmentedPage, detector: StrikeDetector | None) -> None:
    """Score each boxed cell's digit for a stroke across it (DigitSegment.struck), in one batch;
    nothing without a detector."""
    cells = [c for cells in seg.segments if not isinstance(cells, StringLayout) for c in cells if c.view is not None]
    if detector is None or not cells:
        return
    for cell, p in zip(cells, detector.probabilities(np.stack([c.view for c in cells]))):
        cell.struck = float(p)


def struck_digits(
    layout: StringLayout, reading: StringReading, detector: StrikeDetector | None, document: str = "form"
) -> list[bool]:
    """Whether each digit of a free field's reading (its `boxes`, the layout's crop px) was struck
    through, by the detector's look at it framed as a box would frame it (strings.digit_views);
    [] without a detector, with one taught boxed cells alone, and on a check (`document`)."""
    # A check's date and amount are not looked at: their separators, dashes and lead-in strokes
    # beside a digit looked like strokes across it (stop 61: 5.6 points more of the held-out
    # generated checks flagged, 2.3 of ORAND's real amounts, every one of them right; stop 62: a
    # network taught checks too still flagged 2.3 points more of ORAND's, over #9's 20%).
    if detector is None or detector.free_threshold is None or document != "form":
        return []
    views = digit_views(layout, [(x, x + w) for x, _, w, _ in reading.boxes])
    return [bool(p >= detector.free_threshold) for p in detector.probabilities(views)]


def decide_free(
    layout: StringLayout,
    pieces: np.ndarray,
    steps: np.ndarray | None,
    shape: tuple[int, int] | None,
    spec: Field,
    string_model: StringModel | None,
    detector: StrikeDetector | None,
    document: str,
    threshold: float,
    offset: tuple[int, int] = (0, 0),
) -> tuple[StringReading, FieldReading]:
    """Read and decide one free field: by both readers where there are the string model and its
    step probabilities `steps` (V, 64, 15) of the field image of `shape`, else by the cut reader
    alone from its `pieces`' probabilities (M, 11); its digits looked at for strokes across them as
    on a template of that `document`. Returns the reading and the field's decision."""
    if steps is not None and string_model is not None:
        reading = string_model.decide(layout, pieces, steps, spec, shape)
    else:
        reading = decide_string(layout, pieces, spec.separators, spec.pattern)
    struck = struck_digits(layout, reading, detector, document)
    return reading, read_free_field(spec, reading, offset, threshold, struck)


def read_free_image(
    image: np.ndarray, classifier: DigitClassifier, spec: Field, threshold: float, document: str = "form"
) -> tuple[StringLayout, StringReading]:
    """Read one free field's image (strings.field_image's) as a page's free field is read
    (decide_free), its status and reasons set on the reading: the layout the cut reader found and
    the reading, its boxes in the image's pixels."""
    layout = segment_string(image)
    reader = classifier.string_model
    steps = reader.view_probabilities(field_views(image)[None])[0] if reader is not None else None
    pieces = classifier.for_strings.probabilities(layout.images)
    reading, decision = decide_free(layout, pieces, steps, image.shape, spec, reader, classifier.struck, document, threshold)
    reading.status, reading.reasons = decision.status, decision.reasons
    return layout, reading


def page_sequences(seg: SegmentedPage, classifier: DigitClassifier) -> list[np.ndarray] | None:
    """The string model's step probabilities for the page's free fields, read in one batch; None
    when the classifier has no string model beside it."""
    if classifier.string_model is None:
        return None
    inputs = [w[0] for w in seg.wholes or [] if w is not None]
    return list(classifier.string_model.view_probabilities(np.stack(inputs))) if inputs else []


def refuse_threshold_with_risk(threshold: float | None, risk: float | None) -> None:
    """ValueError when a review threshold and a review risk are both asked for one run: the
    threshold would decide, and the risk asked for would be silently ignored."""
    if threshold is not None and risk is not None:
        raise ValueError("give a review threshold or a review risk, not both (the threshold would decide)")


def at_review_risk(template: Template, risk: float | None, threshold: float | None = None) -> Template:
    """The template with `risk` as its review_risk (`--review-risk` for one run; None: as it is).
    ValueError when a threshold is given too (refuse_threshold_with_risk)."""
    refuse_threshold_with_risk(threshold, risk)
    return template if risk is None else replace(template, review_risk=risk)


def review_thresholds(
    classifier: DigitClassifier, threshold: float | None = None, risk: float | None = None, document: str = "form"
) -> tuple[float, float]:
    """The review thresholds in force, (boxed fields', free fields'): `threshold` for both when
    given, else the digit model's for boxed fields and the string model's for free ones, each
    for `risk` (a template's `review_risk`; None: the card's own `review_threshold`) on the
    template's kind of paper, `document` (LiteRTModel.review_threshold_at). ModelError when a
    card has none for that risk."""
    if threshold is not None:
        return threshold, threshold
    reader = classifier.string_model
    free = reader.review_threshold_at(risk, document) if reader is not None else DEFAULT_REVIEW_THRESHOLD
    return classifier.review_threshold_at(risk, document), free


def read_segmented(
    seg: SegmentedPage,
    template: Template | Sequence[Template],
    classifier: DigitClassifier,
    threshold: float | None = None,
) -> PageRead:
    """Classify a segmented page's digits (and read its free fields) and decide its fields by the
    rules of the template it was read as. threshold: the review threshold of every field, or
    None: see review_thresholds."""
    forms = {t.name: t for t in ([template] if isinstance(template, Template) else template)}
    form = forms.get(seg.template) or next(iter(forms.values()))
    boxed, free = review_thresholds(classifier, threshold, form.review_risk, form.document)
    mark_struck(seg, classifier.struck)
    return decide_page(
        seg,
        page_probabilities(seg, classifier),
        form,
        free,
        classifier.field_power(seg.bitonal),
        page_sequences(seg, classifier),
        classifier.string_model,
        boxed,
        classifier.struck,
    )


def read_page(
    page: Page,
    template: Template,
    classifier: DigitClassifier,
    features: ReferenceFeatures | None = None,
    threshold: float | None = None,
) -> PageRead:
    """Read one page completely (threshold: see read_segmented). A page that cannot be registered
    comes back with `error` set."""
    return _read(page, template, classifier, features, threshold)[0]


def _read(
    page: Page,
    template: Template | Sequence[Template],
    classifier: DigitClassifier,
    features: ReferenceFeatures | Sequence | None = None,
    threshold: float | None = None,
) -> tuple[PageRead, SegmentedPage | None]:
    """read_page, and the segmented page it was read from (None where it could not be registered)."""
    try:
        seg = segment_page(page, template, features)
    except RegistrationError as e:
        return PageRead(page.source, page.page, error=str(e)), None
    return read_segmented(seg, template, classifier, threshold), seg


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(state: str, ready, parent: int) -> None:
    """Set up a pool's worker (ReadingPool): wait for the reading state (_reading_state: the
    template, its features, the classifier...) to be `ready`, then read it, pickled, from the
    shared memory block named `state` (none there: the pool closed before any was handed; the
    worker then reads nothing). Passed as the pool's own arguments, those few megabytes would be
    written down each new worker's pipe while the parent waits for the worker to start (0.45 s a
    worker, one after another). `parent`: the pid of the process that runs the pool."""

    # A worker whose parent was killed (kill -9 gives the pool no chance to stop it) ends itself,
    # also when that happened while it was starting.
    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    # At its exit a worker's objects are freed, not searched for cycles first: the interpreter's
    # last collections over everything a worker loaded took 60-100 ms, which the pool's shutdown,
    # and so every run's end, waited for (20 ms now).
    atexit.register(gc.freeze)
    cv2.setNumThreads(1)
    _keep_freed_memory()
    ready.wait()
    try:
        block = shared_memory.SharedMemory(name=state)
    except FileNotFoundError:
        return
    _worker_state.update(pickle.loads(block.buf))  # the block's padding beyond the pickle is ignored
    block.close()


class ReadingPool:
    """Worker processes that read pages (process_paths), started before what they read with is
    ready: a worker costs a new interpreter and its imports (about 0.2 s) before its first page,
    and started first it spends them while this process loads the template and the models; then
    `hand` gives every worker the reading state at once. Close it (or use it as a context
    manager) whether or not a state was handed."""

    def __init__(self, workers: int):
        # Spawned, not forked: forking a process that runs interpreter threads (LiteRT, OpenCV)
        # can deadlock the child.
        spawn = multiprocessing.get_context("spawn")
        # The state's block is named now and made when the state is handed (`hand`).
        self._name = f"formreader_{os.getpid()}_{secrets.token_hex(6)}"
        self._ready = spawn.Event()
        self._state: shared_memory.SharedMemory | None = None
        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers, mp_context=spawn, initializer=_init_worker, initargs=(self._name, self._ready, os.getpid())
        )
        # The workers never take Ctrl-C: it is this process's to handle, and it stops them (a
        # worker interrupted while it imported printed a traceback of its own). They inherit the
        # signals this thread blocks as it spawns them, and a blocked signal stays blocked in the
        # program a process becomes; this process's own Ctrl-C is not lost meanwhile, as it was
        # while the signal was ignored process-wide instead.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for _ in range(workers):  # concurrent.futures starts a spawned worker at a task, not before
                self.executor.submit(int, 0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def hand(self, state: dict) -> None:
        """Give the workers the reading state (_reading_state), once."""
        if self._ready.is_set():
            raise RuntimeError("the reading pool was handed its state already")
        blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        # Should this process be killed, multiprocessing's resource tracker removes the block.
        self._state = shared_memory.SharedMemory(name=self._name, create=True, size=len(blob))
        self._state.buf[: len(blob)] = blob
        self._ready.set()

    def close(self) -> None:
        """Stop the workers (pages not started are dropped) and free the state's shared block."""
        self._ready.set()  # workers still waiting find no state, and read nothing
        self.executor.shutdown(cancel_futures=True)
        if self._state is not None:
            self._state.close()
            self._state.unlink()

    def __enter__(self) -> ReadingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_reading_pool(workers: int, scheduler: str | None = None) -> ReadingPool | None:
    """The local workers a run of `workers` processes reads with, started; None for one process,
    or on a Dask cluster (`scheduler`), whose workers read instead."""
    return ReadingPool(workers) if workers > 1 and not scheduler else None


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep the buffers a page frees for the next page, instead of giving them
    back to the kernel at once and faulting them in again: reading a page allocates and frees tens
    of megabytes of image buffers, and that cost a worker about 6 ms of system time a page (3,000
    page faults), a tenth of its time. The kept memory is bounded (TRIM_KEPT). A no-op where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_KEPT)
    except (OSError, AttributeError):
        pass


def _reading_state(
    template: Template | list[Template],
    features: ReferenceFeatures | list,
    classifier: DigitClassifier,
    threshold: float | None,
    views: bool,
    workers: bool,
) -> dict:
    """What reading a page needs besides the page (_read_or_error). With `workers` the models
    run one thread each: a worker is one of as many as there are cores."""
    return dict(
        template=template,
        features=features,
        classifier=single_threaded(classifier) if workers else classifier,
        threshold=threshold,
        views=views,
    )


def _read_or_error(page: Page | PdfPage | ImageFrame, state: dict | None = None):
    """Render or decode (a listed PDF page or image file: load_page) and read one page whole, by
    `state` (_reading_state; a pool's worker has its own): (PageRead, the registered page as JPEG
    where `views` asks for it, else None), with the reason where the page could not be
    registered; or the PageError of a page that could not be rendered or decoded."""
    state = state or _worker_state
    if isinstance(page, (PdfPage, ImageFrame)):
        page = load_page(page)
        if isinstance(page, PageError):
            return page
    try:
        read, seg = _read(page, state["template"], state["classifier"], state["features"], state["threshold"])
    except Exception as e:  # one broken page must not stop the batch
        return PageRead(page.source, page.page, error=f"internal error while reading page: {type(e).__name__}: {e}"), None
    view = None
    if state["views"] and seg is not None:
        view = cv2.imencode(".jpg", seg.registration.aligned, [cv2.IMWRITE_JPEG_QUALITY, VIEW_QUALITY])[1].tobytes()
    return read, view


class JournalError(RuntimeError):
    """A journal that cannot be resumed with these settings, or one left unfinished."""


class Journal:
    """Append-only record of finished pages (JSON lines), so a crash loses nothing done but the
    file being read (`write`).

    Its first line records the run's `settings` (what decides the results: template and model
    fingerprints, threshold); a run that ends writes a last line saying so, and the journal
    stays beside the results. With `resume`, files recorded as finished (by an interrupted run,
    or a finished one: then only files new since are read) are taken from the journal instead
    of re-read, provided the settings are the same: otherwise JournalError says which differ.
    Without `resume`, an unfinished journal is not silently thrown away either.
    """

    def __init__(self, path: Path | None, resume: bool = False, settings: dict | None = None):
        self.path = path
        self.done: dict[str, int] = {}  # the finished files taken over: source -> pages recorded
        settings = settings or {}
        if path is None:
            return
        # A journal that records no page (a run stopped before its first: a scheduler it could
        # not reach, say) holds nothing to keep, and is begun again.
        if path.exists() and not resume and not _finished(path) and _records_pages(path):
            raise JournalError(f"an interrupted run left {path}: pass --resume to keep the pages it finished, "
                               "or delete that file to start afresh")
        if resume and path.exists():
            before = journal_settings(path)
            differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if differ:
                raise JournalError(f"--resume refused: the earlier run had other settings ({', '.join(differ)}); "
                                   f"run with the same ones, or delete {path} to start afresh")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten beside and moved in: a crash now leaves the old journal or the new, never an empty one.
        # Only finished files are kept (half-done ones are read again), line by line as they were.
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": "run", "settings": settings}) + "\n")
            pending: dict[str, list[str]] = {}  # the lines of files not yet finished
            for line, rec in journal_lines(path) if resume and path.exists() else []:
                if rec.get("kind") == "file_done":
                    lines = pending.pop(rec["source"], [])
                    fh.writelines([*lines, line])
                    self.done[rec["source"]] = len(lines)
                elif rec.get("kind") == "page":
                    pending.setdefault(rec["source"], []).append(line)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        """Append a record. Each is flushed to the system at once (a killed run loses none); the
        disk is waited for (fsync) before a file's end is recorded, and at the run's own lines.
        Resume keeps finished files only, so a page line of a file not yet finished need not
        reach the disk first: a machine that crashes loses at most the file being read and the
        end of the last one, which are read again. (One fsync a file instead of one a line: a
        few milliseconds each, which on a machine of many cores held the one recording process
        back.)"""
        if self.path is None:
            return
        kind = rec.get("kind")
        if kind == "file_done":
            os.fsync(self._fh.fileno())  # its pages on disk before the line that says it is done
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if kind not in ("page", "file_done"):
            os.fsync(self._fh.fileno())

    def close(self, remove: bool = False, finished: bool = True) -> None:
        """Close the journal; `finished`: the run ended (a later run may start afresh or, with
        --resume, read only new files); `remove`: delete it."""
        if self.path is not None:
            if finished:
                self.write({"kind": "run_done"})
            self._fh.close()
            if remove:
                self.path.unlink(missing_ok=True)


def _records_pages(path: Path) -> bool:
    """Whether a journal records any page or finished file."""
    return any(rec.get("kind") in ("page", "file_done") for _, rec in journal_lines(path))


def _finished(path: Path) -> bool:
    """Whether a journal ends with its run's end (a finished run's, not an interrupted one's)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 200))
            last = fh.read().decode("utf-8", "replace").strip().splitlines()
        return bool(last) and json.loads(last[-1]).get("kind") == "run_done"
    except (OSError, ValueError):
        return False


def page_record(read: PageRead) -> dict:
    """A page's outcome as a JSON-able record (also the journal's line format)."""
    return {
        "kind": "page",
        "source": read.source,
        "page": read.page,
        "quality": round(read.quality, 4),
        "rotation_deg": round(read.rotation_deg, 2),
        "template": read.template,
        "error": read.error,
        "fields": [
            {
                "field": f.name,
                "value": f.value,
                "raw": f.raw,
                "text": f.text,
                "confidence": round(f.confidence, 6),
                "status": f.status,
                "reasons": f.reasons,
                "digits": [[d.digit, round(d.confidence, 6)] for d in f.digits],
                "runner_up": [runner_up(d) for d in f.digits],
                "cells": [list(map(int, b)) for b in boxes],  # located boxes (a free field: its one box)
            }
            for f, boxes in zip(read.fields, read.boxes or [[]] * len(read.fields))
        ],
    }


def runner_up(reading: DigitReading) -> list | None:
    """The most probable reading of a cell other than its own, and its probability, where the
    cell has them (the second most probable; the first where a field's pattern chose another)."""
    p = reading.probabilities
    if p is None or len(p) < 2:
        return None
    k = next(int(k) for k in np.argsort(p)[::-1] if label_of(int(k)) != reading.digit)
    return [label_of(k), round(float(p[k]), 6)]


def error_record(err: PageError) -> dict:
    return {"kind": "page", "source": err.source, "page": err.page, "error": err.reason, "fields": []}


def process_paths(
    paths: Iterable[Path],
    template: Template | Sequence[Template],
    classifier: DigitClassifier,
    threshold: float | None = None,
    workers: int | ReadingPool = 1,
    journal: Journal | None = None,
    scheduler: str | None = None,
    views: Path | None = None,
) -> Iterator[dict]:
    """Read every page of every input: yields one record per page or unreadable file, in input
    order, as each is recorded in the `journal`. Files the journal took over as finished
    (Journal.done) are not read again: their records are the journal's.

    Pages are read `workers` at a time, each whole by one worker process (_read_or_error: the
    main process only records what comes back and keeps none of it: memory does not grow with
    the batch); `workers` may be a ReadingPool started earlier, handed the state here and left
    open for its owner to close. With `scheduler`
    (the address of a Dask distributed scheduler, tcp://HOST:PORT) the pages are read on that
    cluster's workers instead of local processes: the same page function, the same results.
    With `views` (a folder), each read page's registered picture is kept there as JPEG (named by
    formreader.export.view_name), written before its record: the review station shows fields
    from it, cut where the record's `box` says. threshold: see read_segmented.
    """
    journal = journal or Journal(None)
    with ExitStack() as owned:
        # The workers are started first: they start while the references' features are made.
        if isinstance(workers, ReadingPool):
            reading_pool = workers  # its owner's to close
        else:
            reading_pool = start_reading_pool(workers, scheduler)
            if reading_pool is not None:
                owned.enter_context(reading_pool)
        # One form, or several: then each page is read as the form it matches (match_form).
        templates = [template] if isinstance(template, Template) else list(template)
        features = [prepare_reference(t.reference) for t in templates]
        if len(templates) == 1:
            template, features = templates[0], features[0]
        render_dpi = int(round(max(t.dpi for t in templates)))
        files = find_inputs(list(paths))
        client = owned.enter_context(_dask_client(scheduler)) if scheduler else None
        state = _reading_state(
            template, features, classifier, threshold, views is not None, reading_pool is not None or client is not None
        )
        if reading_pool is not None:
            reading_pool.hand(state)
        if client is not None:  # the state (template, features, models) travels to each worker once
            (shared,) = client.scatter([state], broadcast=True)

        def submit(page: Page | PdfPage | ImageFrame):
            """Start reading a page; what comes back has .result()."""
            if client is not None:  # the cluster's machines may not see the file: its page travels with the task
                task = carried(page) if isinstance(page, (PdfPage, ImageFrame)) else page
                if isinstance(task, PageError):  # the file went between listing and carrying
                    return _Finished(task)
                return client.submit(_read_or_error, task, shared, pure=False)
            if reading_pool is not None:
                return reading_pool.executor.submit(_read_or_error, page)
            return _Finished(_read_or_error(page, state))

        def record_read(done) -> dict:
            """The record of what reading a page gave (_read_or_error), its picture kept."""
            if isinstance(done, PageError):
                return error_record(done)
            read, view = done
            if views is not None and view is not None:
                write_atomically(views / view_name(read.source, read.page), view)
            return page_record(read)

        # Pages are rendered and read by the workers while the next ones are listed: a window of
        # pages in flight keeps every core busy, and bounds memory whatever the batch. Its items, in
        # input order: a page being read, an unreadable page's record, or a file's end.
        in_flight: deque = deque()
        window = 4 * reading_pool.workers if reading_pool else 4 * workers if client else 0

        def settle(keep: int) -> Iterator[dict]:
            """Record the finished items off the window's front until at most `keep` remain."""
            while len(in_flight) > keep:
                kind, item = in_flight.popleft()
                if kind == "file_done":
                    journal.write({"kind": "file_done", "source": item})
                    continue
                rec = record_read(item.result()) if kind == "page" else item
                journal.write(rec)
                yield rec

        for path in files:
            if str(path) in journal.done:
                continue
            for item in _pages_of(path, render_dpi):
                in_flight.append(("error", error_record(item)) if isinstance(item, PageError) else ("page", submit(item)))
                yield from settle(window)
            in_flight.append(("file_done", str(path)))
        yield from settle(0)


class _Finished:
    """A result computed on the spot, behaving as a finished future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _dask_client(address: str):
    """A client of the Dask distributed scheduler at `address` (formreader[cluster])."""
    try:
        from distributed import Client
    except ImportError as e:
        raise RuntimeError("--scheduler needs Dask distributed: pip install 'formreader[cluster]'") from e
    try:
        _nothing_listens(address)
        return Client(address, timeout="20s")
    except OSError as e:
        raise RuntimeError(f"cannot reach the Dask scheduler at {address}: {e}") from e


def _nothing_listens(address: str) -> None:
    """Raise OSError at once where a tcp:// address's host is unknown or its port refuses
    connections: Dask's client tries again until its timeout (20 s) whatever the cause, so a
    mistyped address kept a run waiting that long. An address that does not answer at all (a slow
    or filtered network) is left to the client's own timeout."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        return
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=3).close()
    except (ConnectionRefusedError, socket.gaierror):
        raise
    except OSError:  # no answer in time: perhaps a slow network, which the client may yet reach
        return


def _pages_of(path: Path, dpi: int) -> Iterator[Page | PdfPage | ImageFrame | PageError]:
    try:
        yield from read_pages(path, pdf_dpi=dpi, render=False, reduce_jpeg=True)
    except Exception as e:  # a reader failing in an unforeseen way costs one file, not the batch
        yield PageError(str(path), 0, f"cannot read file: {type(e).__name__}: {e}")
