"""Fields: combine the readings of a field's cells into a value, a confidence and a status.

A field's confidence is the probability that the whole value is right: the product of its cells'
calibrated probabilities (each cell is read independently). A field goes to review when that
confidence is under the threshold, or when it breaks a rule of the template: a digit missing
where the length is fixed, a gap between digits, ink that is not a digit, an empty required field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from formreader.classify import DigitReading
from formreader.template import Field

# Chosen from measurements on held-out generated forms (benchmarks/evaluate_forms.py): below it
# the fields that were wrong are caught while few right ones are sent to a person.
DEFAULT_REVIEW_THRESHOLD = 0.9
# Confidence that a cell with no ink at all is blank; a cell whose ink was all rejected (specks,
# pieces of line) is less certain, since a very faint digit looks the same.
BLANK_CONFIDENCE = 0.999
STRAY_INK_CONFIDENCE = 0.9


@dataclass
class FieldReading:
    name: str
    value: str  # digits only, '' when blank
    confidence: float
    status: str  # 'ok' or 'review'
    reasons: list[str] = field(default_factory=list)
    digits: list[DigitReading] = field(default_factory=list)


def read_field(spec: Field, cells: list[DigitReading], threshold: float = DEFAULT_REVIEW_THRESHOLD) -> FieldReading:
    """Decide a field from its cells' readings (one per cell, left to right)."""
    reasons: list[str] = []
    confidence = 1.0
    for c in cells:
        confidence *= c.confidence
    marks = "".join(c.digit if c.digit else " " for c in cells)
    value = marks.replace(" ", "").replace("?", "")
    if "?" in marks:
        reasons.append(f"mark that is not a digit in cell {marks.index('?') + 1}")
    stripped = marks.strip()
    if " " in stripped:
        reasons.append("gap between digits")
    if not stripped:
        if not spec.optional:
            reasons.append("required field is empty")
    elif spec.length is not None and len(value) != spec.length:
        reasons.append(f"{len(value)} digits where {spec.length} are expected")
    if confidence < threshold:
        reasons.append(f"low confidence {confidence:.2f}")
    status = "review" if reasons else "ok"
    return FieldReading(spec.name, value, confidence, status, reasons, cells)
