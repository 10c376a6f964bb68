"""Pictures for people: the registered page with every cell, the digit read and its confidence.

Fields that go to review are drawn in a warning colour (orange), the rest in green.
"""

from __future__ import annotations

import cv2
import numpy as np

from formreader.pipeline import PageRead

OK = (40, 160, 40)  # BGR
REVIEW = (0, 140, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_overlay(aligned: np.ndarray, read: PageRead) -> np.ndarray:
    """aligned: (H, W) uint8 page in the template frame. Returns (H, W, 3) uint8 BGR."""
    out = cv2.cvtColor(aligned, cv2.COLOR_GRAY2BGR)
    for f, boxes in zip(read.fields, read.boxes):
        colour = OK if f.status == "ok" else REVIEW
        for (x, y, w, h), d in zip(boxes, f.digits):
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 2)
            if d.digit:
                cv2.putText(out, d.digit, (x + 2, y + h + 16), FONT, 0.55, colour, 2, cv2.LINE_AA)
                cv2.putText(out, f"{d.confidence:.2f}"[1:], (x + 12, y + h + 16), FONT, 0.35, colour, 1, cv2.LINE_AA)
        x0, y0 = boxes[0][0], boxes[0][1]
        label = f"{f.name} = {f.value or '(empty)'}  p={f.confidence:.3f}  {f.status}"
        if f.reasons:
            label += ": " + ", ".join(f.reasons)
        cv2.putText(out, label, (x0, max(12, y0 - 8)), FONT, 0.45, colour, 1, cv2.LINE_AA)
    return out
