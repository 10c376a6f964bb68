"""Pictures for people: the registered page with every cell, the digit read and its confidence.

Fields that go to review are drawn in a warning colour (orange), the rest in green. A free-
written field shows each digit it read and, in red, where it cut touching digits apart.
"""

from __future__ import annotations

import cv2
import numpy as np

from formreader.pipeline import PageRead
from formreader.reading.locate import bounding_box

OK = (40, 160, 40)  # BGR
REVIEW = (0, 140, 255)
CUT = (30, 30, 220)
FREE = (200, 110, 20)
CANDIDATE = (150, 150, 150)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _digit_label(out: np.ndarray, digit: str, confidence: float, x: int, y: int, colour) -> None:
    cv2.putText(out, digit, (x + 2, y), FONT, 0.55, colour, 2, cv2.LINE_AA)
    shown = "1" if confidence >= 0.995 else f"{confidence:.2f}"[1:]  # '.97'; a sure one is '1', not '.00'
    cv2.putText(out, shown, (x + 12, y), FONT, 0.35, colour, 1, cv2.LINE_AA)


def draw_overlay(aligned: np.ndarray, read: PageRead) -> np.ndarray:
    """aligned: (H, W) uint8 page in the template frame. Returns (H, W, 3) uint8 BGR."""
    out = cv2.cvtColor(aligned, cv2.COLOR_GRAY2BGR)
    for f, boxes in zip(read.fields, read.boxes):
        colour = OK if f.status == "ok" else REVIEW
        if f.marks or f.raw or f.cuts:  # a free-written field
            x, y, w, h = boxes[0]
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 2)
            for cut in f.cuts:
                cv2.line(out, (cut, y + 2), (cut, y + h - 3), CUT, 2)
            readable = [d for d in f.digits if d.digit != "?"]
            for (mx, my, mw, mh), d in zip(f.marks, readable):
                cv2.rectangle(out, (mx, my), (mx + mw - 1, my + mh - 1), colour, 1)
                _digit_label(out, d.digit, d.confidence, mx, y + h + 16, colour)
        else:
            for (x, y, w, h), d in zip(boxes, f.digits):
                cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 2)
                if d.digit:
                    _digit_label(out, d.digit, d.confidence, x, y + h + 16, colour)
        x0, y0 = boxes[0][0], boxes[0][1]
        shown = f.raw if f.raw else f.value
        label = f"{f.name} = {shown or '(empty)'}  p={f.confidence:.3f}  {f.status}"
        if f.reasons:
            label += ": " + ", ".join(f.reasons)
        cv2.putText(out, label, (x0, max(12, y0 - 8)), FONT, 0.45, colour, 1, cv2.LINE_AA)
    return out


def draw_template(blank: np.ndarray, fields: list, candidates: list = ()) -> np.ndarray:
    """A proposed template's picture: each field (formreader.reading.template.Field) outlined and
    numbered as in the YAML (field_N -> N), boxed fields in green, free ones in blue, and the
    commented-out candidates in grey. blank: (H, W) uint8. Returns (H, W, 3) uint8 BGR."""
    out = cv2.cvtColor(blank, cv2.COLOR_GRAY2BGR)
    for f, colour in [*((f, OK if f.kind != "free" else FREE) for f in fields), *((f, CANDIDATE) for f in candidates)]:
        boxes = [f.box] if f.kind == "free" else list(f.cells)
        for x, y, w, h in boxes:
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 2)
        x0, y0, _, _ = bounding_box(boxes)
        label = f.name.removeprefix("field_")
        cv2.putText(out, label, (x0, max(12, y0 - 6)), FONT, 0.6, colour, 2, cv2.LINE_AA)
    return out
