"""Field names from the labels printed beside the fields of a blank form.

Read by Tesseract where it is installed (`pip install 'formreader[ocr]'` and the `tesseract`
program); without it, `template detect` keeps the names field_1, field_2, ... A label is the
group of words nearest to the field on its left, on the field's line, or else the words just
above it ("Customer no." -> customer_no, "Date (DD/MM/YYYY)" -> date).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace

import numpy as np

from formreader.reading.locate import Box, bounding_box


def ocr_available() -> bool:
    """Whether printed text can be read here (pytesseract and the tesseract program)."""
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return False
    return shutil.which("tesseract") is not None


def identifier(text: str) -> str:
    """A label as a field name: parenthesised parts dropped, lower case, words joined by _."""
    words = re.findall(r"[a-z][a-z0-9]*", re.sub(r"\([^)]*\)", " ", text.lower()))
    return "_".join(words)[:40]


def _words(region: np.ndarray) -> list[tuple[int, int, int, int, str]]:
    """Words Tesseract reads with confidence in a grey region: (x, y, w, h, text)."""
    import pytesseract

    if region.size == 0 or min(region.shape) < 8:
        return []
    data = pytesseract.image_to_data(region, config="--psm 6", output_type=pytesseract.Output.DICT)
    found = []
    for x, y, w, h, text, conf in zip(data["left"], data["top"], data["width"], data["height"], data["text"], data["conf"]):
        if float(conf) >= 60 and re.search(r"[A-Za-z]{2}", text or ""):
            found.append((int(x), int(y), int(w), int(h), text))
    return found


def label_of(blank: np.ndarray, boxes: list[Box], dpi: float, others: list[Box]) -> str:
    """The name the printed label of a field gives ('' when none is read). boxes: the field's
    boxes (its cells, or its one free box); others: every other field's boxes, which bound the
    region searched on the left."""
    x0, y0, w, h = bounding_box(boxes)
    x1, y1 = x0 + w, y0 + h
    fence = max([b[0] + b[2] for b in others if b[0] + b[2] <= x0 and b[1] < y1 and y0 < b[1] + b[3]], default=0)
    start = max(fence + 2, x0 - int(3.5 * dpi))
    pad = int(0.05 * dpi)
    words = _words(blank[max(0, y0 - pad) : y1 + pad, start : max(start, x0 - 4)])
    if words:  # the group of words nearest the field: none more than half an inch from the next
        words.sort(key=lambda w: -w[0])
        group = [words[0]]
        for w in words[1:]:
            if group[-1][0] - (w[0] + w[2]) <= 0.5 * dpi:
                group.append(w)
        return identifier(" ".join(w[4] for w in reversed(group)))
    above = _words(blank[max(0, y0 - int(0.45 * dpi)) : max(0, y0 - 2), x0:x1])
    return identifier(" ".join(w[4] for w in sorted(above)))


def name_fields(blank: np.ndarray, fields: list, dpi: float) -> list:
    """The proposed fields (formreader.reading.template.Field) named after their printed labels
    where one is read and the name is not taken (nor a results column); the others keep theirs."""
    from formreader.reading.schema import RESERVED_NAMES

    spans = [[f.box] if f.kind == "free" else list(f.cells) for f in fields]
    taken: set[str] = set()
    named = []
    for i, (f, boxes) in enumerate(zip(fields, spans)):
        others = [b for j, s in enumerate(spans) if j != i for b in s]
        name = label_of(blank, boxes, dpi, others)
        if name and name not in taken and name not in RESERVED_NAMES:
            f = replace(f, name=name)
        taken.add(f.name)
        named.append(f)
    return named
