"""The Python API for programs that embed formreader."""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from formreader.pipeline import (
    Journal,
    at_review_risk,
    process_paths,
    read_free_image,
    refuse_threshold_with_risk,
    review_thresholds,
)
from formreader.reading.classify import DigitClassifier, DigitReading, reading_from_probabilities, single_threaded
from formreader.reading.fields import unread_cell
from formreader.reading.ingest import grey_crop, grey_crops
from formreader.reading.segment import MNIST_SIZE, segment_cells
from formreader.reading.strings import StringReading, field_image
from formreader.reading.template import DOCUMENTS, Field, Template, load_template

if TYPE_CHECKING:
    import pandas as pd

_classifiers: dict[str, DigitClassifier] = {}
_one_thread: dict[str, DigitClassifier] = {}  # the same models with one-thread interpreters (read_digits)


def get_classifier(model: Path | str | None = None) -> DigitClassifier:
    """The classifier for a model path (default: the shipped model), loaded once per process."""
    key = str(model or "")
    if key not in _classifiers:
        _classifiers[key] = DigitClassifier.load(Path(model) if model else None)
    return _classifiers[key]


def read_digits(crops: list[np.ndarray], model: Path | str | None = None) -> list[DigitReading]:
    """Read single digits from grey crops as scanned: any size, dark ink on light paper.

    Each crop is segmented, normalised and classified as a form's boxed cell is (by the digit
    network and its companion: DigitClassifier.cell_probabilities). A crop with no digit in it
    comes back as DigitReading(digit='', confidence=...) rather than a guess; '?' marks ink
    that is not a digit, or more ink than specks where no digit was found (confidence 0.1, as a
    form's cell). Crops may also be RGB, bool, 16-bit or float, and light ink on dark
    (MNIST's own arrays): see formreader.reading.ingest.grey_crop. A crop that is no image
    raises ValueError naming it, before any is read.
    """
    crops = grey_crops(crops)
    classifier = _one_thread_each(model)
    readings: list[DigitReading | None] = [None] * len(crops)

    def settle(done: tuple[Future, list[int]]) -> None:
        probabilities, index = done
        for i, p in zip(index, probabilities.result()):
            readings[i] = reading_from_probabilities(p)

    # Chunks are classified by one-thread interpreters, one per core, while the next chunk is
    # segmented (LiteRT runs without the GIL): an interpreter of two threads stalls whenever the
    # segmenting thread takes one of its cores, and one-thread interpreters never wait on each
    # other. Each chunk is cut in one part per core, so that a call of one chunk, and the last
    # chunk of any, uses every core; a part holds READ_BATCH digits at least, and there are READ_THREADS
    # at most (each thread makes its own interpreters, once per call). At most three chunks
    # wait, so memory stays bounded.
    workers = min(os.cpu_count() or 1, READ_THREADS)
    pending: deque[tuple[Future, list[int]]] = deque()
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(crops), READ_CHUNK):
            segments = segment_cells(crops[start : start + READ_CHUNK])
            index = [start + k for k, s in enumerate(segments) if s.image is not None]
            for k, s in enumerate(segments):
                if s.image is None:
                    readings[start + k] = unread_cell(s.stray_ink)
            images = np.array([segments[i - start].image for i in index], np.float32).reshape(-1, MNIST_SIZE, MNIST_SIZE)
            while len(pending) > 2 * workers:
                settle(pending.popleft())
            parts = max(1, min(workers, math.ceil(len(index) / READ_BATCH)))
            for part in np.array_split(np.arange(len(index)), parts):
                if len(part):
                    pending.append((pool.submit(classifier.cell_probabilities, images[part]), [index[i] for i in part]))
        while pending:
            settle(pending.popleft())
    return readings


def _one_thread_each(model: Path | str | None) -> DigitClassifier:
    """get_classifier's model with one-thread interpreters (single_threaded), made once per process."""
    key = str(model or "")
    if key not in _one_thread:
        _one_thread[key] = single_threaded(get_classifier(model))
    return _one_thread[key]


READ_CHUNK = 1024  # crops segmented at a time by read_digits
READ_THREADS = 8  # classifying threads of read_digits, at most
READ_BATCH = 64  # digits a classifying thread is given, at least (two of DigitClassifier.probabilities' batches)


def process_folder(
    folder: Path | str,
    template: Template | Path | str,
    model: Path | str | None = None,
    review_threshold: float | None = None,
    workers: int = 1,
    review_risk: float | None = None,
) -> pd.DataFrame:
    """Read every scan under `folder`; one row per field per page (see formreader.export).
    review_threshold: as `formreader process --review-threshold` (None: the models', for the
    template's review_risk, or `review_risk` when given: as `--review-risk`). Giving both is a
    ValueError, as the CLI refuses both options.

    The returned frame's `attrs` hold the other tables: 'digits', 'wide' and 'errors'.
    """
    from formreader.export import results_frames

    if not isinstance(template, Template):
        template = load_template(Path(template))
    template = at_review_risk(template, review_risk, review_threshold)  # ValueError when both are given
    classifier = get_classifier(model)
    review_thresholds(classifier, review_threshold, template.review_risk, template.document)  # a risk with no threshold: now
    records = process_paths([Path(folder)], template, classifier, review_threshold, workers, Journal(None))
    frames = results_frames(records)
    out = frames["fields"]
    out.attrs.update({k: v for k, v in frames.items() if k != "fields"})
    return out


def read_number(
    image: np.ndarray,
    model: Path | str | None = None,
    separators: str = ".,-/",
    pattern: str = "",
    review_threshold: float | None = None,
    review_risk: float | None = None,
    document: str = "form",
) -> StringReading:
    """Read a number written freely (no boxes) in a grey crop, dark ink on light paper.

    Returns a StringReading: `value` (digits only), `raw` (with separators, e.g. '1.234,56',
    and a '?' for each mark that is not a digit), `confidence` (calibrated probability that the
    digits are right), the digits, where touching digits were cut apart, and the decision a free
    field of a form gets: `status` ('ok' or 'review') and `reasons`. `separators` may stand
    between digits; `pattern`, a regular expression for the whole raw reading, settles what
    looks like both a slash and a 1, and a reading that breaks it goes to review. The image may
    also be RGB, bool, 16-bit or float, light ink on dark (formreader.reading.ingest.grey_crop).
    review_threshold: as `formreader process --review-threshold` (None: the string model's for
    `review_risk`, as a free field of a template with that review_risk gets; pipeline.review_thresholds).
    Giving both is a ValueError. `document`: the kind of paper the number is on, as a template's
    ('form', or 'check': a bank check's amount or date), whose validation fields hold the risk.
    """
    refuse_threshold_with_risk(review_threshold, review_risk)
    if document not in DOCUMENTS:
        raise ValueError(f"document {document!r}: one of {', '.join(DOCUMENTS)}")
    image, (x, y) = field_image(grey_crop(image))  # the writing, where it is small in the crop
    classifier = get_classifier(model)
    spec = Field("number", kind="free", optional=True, separators=separators, pattern=pattern)
    threshold = review_thresholds(classifier, review_threshold, review_risk, document)[1]
    _, reading = read_free_image(image, classifier, spec, threshold, document)  # as a page's free field is read
    reading.boxes = [(bx + x, by + y, bw, bh) for bx, by, bw, bh in reading.boxes]  # the given crop's pixels
    reading.cuts = [c + x for c in reading.cuts]
    return reading
