"""Fields: combine the readings of a field's cells into a value, a confidence and a status.

A field's confidence is the probability that the whole value is right: the product of its cells'
calibrated probabilities (each cell is read independently), and for a field with a pattern or a
check digit, that product among the readings they allow (a date's day cannot start with 7, so a 2
read where a 7 was the alternative is surer than the cell alone says). A field goes to review when
that confidence is under the threshold, or when it breaks a rule of the template: a digit missing
where the length is fixed, a gap between digits, ink that is not a digit, an empty required field,
a reading its pattern or its check digit does not allow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from formreader.reading.classify import DEFAULT_REVIEW_THRESHOLD, DigitReading
from formreader.reading.strings import StringReading
from formreader.reading.template import Field

# Confidence that a cell with no ink at all is blank.
BLANK_CONFIDENCE = 0.999
# A cell whose ink was all rejected, but more of it than specks leave (STRAY_INK_FRACTION of the
# crop), reads '?': what is left of a digit the scan broke up, or a mark a person should see. The
# field's value leaves it out, and is right only if the cell held no digit: on the forms of
# `formreader calibrate` (the model's validation writers) every one of 11 such cells held one, and
# none of the 1,433 cells judged blank with less ink did (at 0.9, as before, '235' was read '35'
# and `ok`).
STRAY_INK_FRACTION = 0.004
STRAY_INK_CONFIDENCE = 0.1
# A cell whose writing leaves this share of its box's area beyond its crop's margin, above or
# below the box (segment.ink_beyond_boxes), was cut where it crossed the box's line or the crop's
# edge, and its digit may be another: the field goes to review. Chosen on the model's validation
# writers' forms (stop 43, 20 pages of each source and style): written inside the boxes, no field of
# 1,080 leaves that much (at 0.005, one); written taller than the boxes (synth.LARGE_WRITING), 12 of
# the 16 fields read wrong with a confident `ok` do (at 0.01, 10).
CROSSING_INK = 0.007


def unread_cell(stray_ink: float) -> DigitReading:
    """The reading of a cell (or crop) in which segmentation found no digit: blank, or '?' when
    more ink was rejected than specks leave (stray_ink: its share of the crop)."""
    if stray_ink > STRAY_INK_FRACTION:
        return DigitReading("?", STRAY_INK_CONFIDENCE)
    return DigitReading("", BLANK_CONFIDENCE)


@dataclass
class FieldReading:
    name: str
    value: str  # digits only, '' when blank
    confidence: float
    status: str  # 'ok' or 'review'
    reasons: list[str] = field(default_factory=list)
    digits: list[DigitReading] = field(default_factory=list)
    raw: str = ""  # free fields: the digits with their separators, as written
    cuts: list[int] = field(default_factory=list)  # free fields: x (page px) of splits between touching digits
    marks: list[tuple[int, int, int, int]] = field(default_factory=list)  # free fields: each digit's box, page px
    text: str = ""  # the number as written: a free field's raw reading, boxes put in their field's format


def read_field(
    spec: Field,
    cells: list[DigitReading],
    threshold: float = DEFAULT_REVIEW_THRESHOLD,
    power: float = 1.0,
    beyond: Sequence[float] = (),
    struck: Sequence[bool] = (),
) -> FieldReading:
    """Decide a field from its cells' readings (one per cell, left to right).

    power: the field confidence is the product of the cells' raised to it, a calibration fitted
    per model on forms of writers it was not trained on (`formreader calibrate`): cells are not
    wrong independently (a writer who makes one ugly digit makes several), so the plain product
    misstates a field's chance of being right. A field with a pattern or a check digit: the
    product is taken among the readings they allow (module docstring) before the power.
    beyond: each cell's handwriting beyond its box's lines (DigitSegment.beyond), when known.
    struck: whether each cell's digit was struck through (pipeline.mark_struck), when known: what
    its writer meant is not there to read.
    """
    reasons: list[str] = []
    first = "".join(c.digit for c in cells)
    allowed = 1.0  # the probability that the cells hold a reading the field's rules allow
    if (spec.pattern or spec.check) and first and "?" not in first:
        matches = allowed_readings(cells, spec.pattern, spec.check)
        broken = broken_rule(spec, first)
        if not broken:
            # The field's value is one its rules allow: its chance of being right is its share
            # of theirs. Only here: where the ink reads as nothing they allow (no date), the
            # writer may have written that, and the plain product stays (a person decides anyway).
            allowed = sum(math.exp(score) for score, _ in matches) or 1.0
        elif not matches:
            reasons.append(f"'{first}' {broken}")
        else:
            # The likeliest reading breaks the field's rule (a day 76, a month 13, a wrong check
            # digit): the likeliest reading that keeps it is read instead, and a person decides.
            cells = _read_as(cells, matches[0][1])
            reasons.append(f"read '{first}', which {broken}")
    confidence = 1.0
    for c in cells:
        confidence *= c.confidence
    confidence = min(1.0, confidence / allowed) ** power
    marks = "".join(c.digit if c.digit else " " for c in cells)
    value = marks.replace(" ", "").replace("?", "")
    if "?" in marks:
        reasons.append(f"mark that is not a digit in cell {marks.index('?') + 1}")
    crossing = [k for k, share in enumerate(beyond) if share > CROSSING_INK]
    if crossing:
        reasons.append(f"writing crosses the box's lines in cell {crossing[0] + 1}")
    voided = [k for k, s in enumerate(struck) if s]
    if voided:
        reasons.append(f"a stroke across the digit in cell {voided[0] + 1}: struck through?")
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
    return FieldReading(spec.name, value, confidence, status, reasons, cells, text=written(spec, marks))


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits ends in its Luhn (mod 10) check digit, as card numbers, IMEIs
    and many account numbers do: every second digit from the right doubled (less 9 when over 9),
    the sum a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return bool(digits) and total % 10 == 0


# Check digits a field may carry (template `check`): the digits read -> whether they pass.
CHECKS = {"luhn": luhn_valid}


def keeps_check(check: str, digits: str) -> bool:
    """Whether `digits` pass the check digit `check` (a key of CHECKS); any do where it is ''."""
    return not check or CHECKS[check](digits)


def broken_rule(spec: Field, digits: str) -> str:
    """What a boxed field's digits read break of its pattern and check digit, as a reason's end
    ("does not fit the field's pattern"), or '' when they keep both."""
    if spec.pattern and not re.fullmatch(spec.pattern, digits):
        return "does not fit the field's pattern"
    if not keeps_check(spec.check, digits):
        return f"fails its {spec.check} check digit"
    return ""


def allowed_readings(
    cells: list[DigitReading], pattern: str = "", check: str = "", beam: int = 64, floor: float = 1e-4
) -> list[tuple[float, list[int]]]:
    """The readings of the cells whose value matches `pattern` (a regular expression for the
    digits, blank cells left out; '' any) and passes the `check` digit (CHECKS; '' none),
    likeliest first, as (log of the product of their cells' probabilities, [digit per written
    cell]); [] when none does. A beam of `beam` prefixes, each still able to match; digits under
    `floor` in a cell are not tried there (they leave out less than a thousandth a cell). The
    total of the matches is what read_field divides by: on the forms of `evaluate_forms.py` a
    beam of 256 changed a date's by over 1% for one date of 720."""
    import regex  # partial matching of a prefix against the pattern

    compiled = regex.compile(pattern) if pattern else None

    def fits(text: str, partial: bool) -> bool:
        return compiled is None or compiled.fullmatch(text, partial=partial) is not None

    prefixes: list[tuple[float, list[int]]] = [(0.0, [])]
    for c in (c for c in cells if c.digit):
        if c.probabilities is None:
            return []
        options = [k for k in range(10) if c.probabilities[k] >= floor]
        grown = [
            (score + math.log(c.probabilities[k]), [*digits, k])
            for score, digits in prefixes
            for k in options
            if fits("".join(map(str, [*digits, k])), True)
        ]
        prefixes = sorted(grown, key=lambda p: -p[0])[:beam]
    return [(score, d) for score, d in prefixes if fits(text := "".join(map(str, d)), False) and keeps_check(check, text)]


def _read_as(cells: list[DigitReading], digits: list[int]) -> list[DigitReading]:
    """The cells with their written ones read as `digits` (one per written cell, in order)."""
    chosen = iter(digits)
    return [
        DigitReading(str(k := next(chosen)), float(c.probabilities[k]), c.probabilities) if c.digit else c
        for c in cells
    ]


def written(spec: Field, marks: str) -> str:
    """A boxed field's reading as written: `marks` (one character per cell, ' ' for a blank
    one) put into the field's format, blank cells left out and print before the first or after
    the last digit dropped ('  923.15' in '#####.##' -> '923.15'; '' for an empty field)."""
    if not spec.format:
        return marks.replace(" ", "")
    cells = iter(marks)
    pieces = [(next(cells), True) if c == "#" else (c, False) for c in spec.format]
    written_cells = [i for i, (c, cell) in enumerate(pieces) if cell and c != " "]
    if not written_cells:
        return ""
    inside = pieces[written_cells[0] : written_cells[-1] + 1]
    return "".join(c for c, cell in inside if not (cell and c == " "))


def reading_pattern(spec: Field) -> str:
    """The regular expression a free field's whole reading may take, for the string model's
    beam search: the field's `pattern`, else digits with its separators only between them, as
    many as its length rules allow."""
    if spec.pattern:
        return spec.pattern
    low = spec.length or spec.min_length or 1
    high = spec.length or spec.max_length
    seps = re.escape(spec.separators)
    between = f"[{seps}]?" if spec.separators else ""
    return rf"\d(?:{between}\d){{{max(0, low - 1)},{'' if high is None else max(0, high - 1)}}}"


def read_free_field(
    spec: Field,
    reading: StringReading,
    offset: tuple[int, int] = (0, 0),
    threshold: float = DEFAULT_REVIEW_THRESHOLD,
    struck: Sequence[bool] = (),
) -> FieldReading:
    """Decide a free-written field from its string reading; offset: the crop's corner on the page.
    A field of low confidence names the other reader's digits where they differ. struck: whether
    each digit read was struck through (pipeline.struck_digits), when known."""
    reasons: list[str] = []
    n = len(reading.value)
    if reading.unreadable:
        reasons.append(f"{reading.unreadable} mark(s) that are not digits")
    voided = [k for k, s in enumerate(struck) if s]
    if voided:
        reasons.append(f"a stroke across digit {voided[0] + 1}: struck through?")
    if not reading.raw:
        if not spec.optional:
            reasons.append("required field is empty")
    elif spec.length is not None and n != spec.length:
        reasons.append(f"{n} digits where {spec.length} are expected")
    elif spec.min_length is not None and n < spec.min_length:
        reasons.append(f"{n} digits where at least {spec.min_length} are expected")
    elif spec.max_length is not None and n > spec.max_length:
        reasons.append(f"{n} digits where at most {spec.max_length} are expected")
    unexpected = sorted({c for c in reading.raw if c in ".,-/" and c not in spec.separators})
    if unexpected:
        reasons.append(f"separator {' '.join(unexpected)} where none is expected")
    if reading.raw and spec.pattern and not re.fullmatch(spec.pattern, reading.raw):
        reasons.append(f"'{reading.raw}' is not written as the field's pattern expects")
    if reading.value and not keeps_check(spec.check, reading.value):
        reasons.append(f"'{reading.value}' fails its {spec.check} check digit")
    confidence = reading.confidence if reading.raw else BLANK_CONFIDENCE
    if confidence < threshold:
        reasons.append(f"low confidence {confidence:.2f}" + (f" (cut into digits: '{reading.other}')" if reading.other else ""))
    dx, dy = offset
    return FieldReading(
        spec.name,
        reading.value,
        confidence,
        "review" if reasons else "ok",
        reasons,
        reading.digits,
        reading.raw,
        [x + dx for x in reading.cuts],
        [(x + dx, y + dy, w, h) for x, y, w, h in reading.boxes],
        text=reading.raw,
    )
