"""Form templates: a YAML file naming the digit fields on a blank reference image.

Schema (coordinates are pixels of the reference image; a cell is a box's interior)::

    name: demo_form            # free text
    reference: demo_form.png   # blank form, path relative to this file
    dpi: 150                   # resolution of the reference image
    fields:
      - name: customer_no      # unique; becomes the CSV's field name / column
        cells: [[x, y, w, h], ...]   # one box per digit, left to right
        length: 8              # optional: exactly this many digits
        optional: false        # optional: true if the field may be left empty
        pattern: '4\\d{7}'       # optional: a regular expression the digits read must match
        check: luhn            # optional: a check digit the digits read must pass (Luhn, mod 10)
      - name: amount           # a number written freely in one box (a check's amount)
        kind: free
        box: [x, y, w, h]
        min_length: 3          # optional: length, min_length, max_length (digits)
        separators: ".,"       # separators that may stand between digits (true: any of . , - /)
        pattern: '(\\d{1,3}(,\\d{3})*|\\d+)\\.\\d{2}'  # optional: a regular expression the
                               # whole reading (digits and separators) must match
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from formreader.reading.locate import Box, BoxLimits, find_boxes, find_tick_cells, overlaps, sort_reading_order


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file, field and problem."""


@dataclass(frozen=True)
class Field:
    """A field: boxes with one digit each, or (kind 'free') one box holding a written number."""

    name: str
    cells: tuple[Box, ...] = ()
    length: int | None = None  # exactly this many digits
    optional: bool = False  # may be left empty
    kind: str = "boxes"  # 'boxes' or 'free'
    box: Box | None = None  # kind 'free': the box the number is written in
    min_length: int | None = None  # kind 'free': digits allowed, when not exact
    max_length: int | None = None
    separators: str = ""  # kind 'free': separators that may stand between digits, of . , - /
    pattern: str = ""  # regular expression the whole reading must match (boxes: the digits read)
    check: str = ""  # a check digit the digits read must pass: 'luhn' (fields.CHECKS), '' none
    format: str = ""  # kind 'boxes': how the number is written, '#' a box, e.g. '#####.##', '##/##/####'
    numeric: bool = False  # a quantity (not an identifier): a number cell in workbooks


@dataclass
class Template:
    name: str
    reference: np.ndarray  # (H, W) uint8, the blank form
    dpi: float
    fields: tuple[Field, ...]
    path: str = ""
    # The share of fields the review threshold may let out wrong but `ok`; None: the models' own
    # (their cards' review_risk). The threshold for it is the models' (review_threshold_at).
    review_risk: float | None = None
    # The kind of paper (DOCUMENTS): the risk is held on validation fields of that kind where the
    # models' cards were calibrated so (the string model's, for free fields).
    document: str = "form"

    @property
    def cells(self) -> list[Box]:
        """The cells of all boxed fields, in field order."""
        return [c for f in self.fields for c in f.cells]


MAX_TEMPLATE_BYTES = 1_000_000
DOCUMENTS = ("form", "check")  # the kinds of paper a template's `document` may name


def load_template(path: Path) -> Template:
    """Read and check a template YAML file and its reference image. Raises TemplateError naming
    every problem at once (formreader.reading.schema), each with its line and field."""
    from formreader.reading.ingest import PageError, read_pages

    path = Path(path)
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TemplateError(f"{where}: cannot read template: {e.strerror or e}") from e
    if len(data) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{where}: {len(data)} bytes is too large for a template (limit {MAX_TEMPLATE_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"{where}: not UTF-8 text (byte {e.start}): save the template as UTF-8") from e
    # The schema (pydantic) and YAML are imported here, not with the module: a worker that is
    # handed a loaded template never reads one, and starts without them.
    import yaml

    from formreader.reading.schema import layout_problems, structure_problems

    # libyaml's parser where PyYAML was built with it: the pure-Python one took 50 ms of a run's
    # start to read the demo template three times over.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # Aliases are refused before anything is built: a few hundred bytes of nested aliases
        # (a "billion laughs") expand to gigabytes, and a template never needs them.
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                raise TemplateError(f"{where}: YAML anchors and aliases (&name, *name) are not allowed in a template")
        doc = yaml.load(text, Loader=loader)
        node = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as e:
        raise TemplateError(f"{where}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise TemplateError(f"{where}: expected a mapping with 'reference', 'dpi' and 'fields'")
    problems = structure_problems(doc, node)
    reference, image_dpi = None, None
    if isinstance(doc.get("reference"), str):
        ref_path = path.parent / doc["reference"]
        pages = list(read_pages(ref_path)) if ref_path.exists() else []
        if not pages or isinstance(pages[0], PageError):
            reason = pages[0].reason if pages else "file not found"
            problems.append(f"reference image {ref_path}: {reason}")
        else:
            reference, image_dpi = pages[0].image, pages[0].dpi
    if not problems and reference is not None:
        problems = layout_problems(doc, node, reference.shape, image_dpi)
    if problems:
        listed = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
        raise TemplateError(f"{where}: {listed}")
    fields = tuple(_field(f) for f in doc["fields"])
    risk = doc.get("review_risk")
    return Template(
        str(doc.get("name") or path.stem), reference, float(doc.get("dpi", 150)), fields, where,
        None if risk is None else float(risk), str(doc.get("document", "form")),
    )


def _field(doc: dict) -> Field:
    """A field of a template that passed the schema."""
    rules = {k: doc.get(k) for k in ("length", "optional", "format", "numeric", "min_length", "max_length", "pattern", "check")}
    rules = {k: v for k, v in rules.items() if v is not None}
    if doc.get("kind") == "free":
        separators = doc.get("separators", "")
        separators = ".,-/" if separators is True else separators or ""
        return Field(doc["name"], kind="free", box=tuple(doc["box"]), separators=separators, **rules)
    return Field(doc["name"], tuple(tuple(c) for c in doc["cells"]), **rules)


def group_fields(boxes: list[Box], max_gap: float = 2.0) -> list[list[Box]]:
    """Group boxes in reading order into fields: runs of boxes of one size on one line.

    A run goes on across gaps up to `max_gap` box widths, so that printed separators
    (the / of a date, the , of an amount) leave one field; larger gaps start a new field.
    """
    fields: list[list[Box]] = []
    for box in boxes:
        if fields:
            run = fields[-1]
            last = run[-1]
            width = float(np.median([b[2] for b in run]))
            height = float(np.median([b[3] for b in run]))
            same_line = abs((box[1] + box[3] / 2) - (last[1] + last[3] / 2)) < 0.5 * height
            same_size = abs(box[3] - height) < 0.25 * height
            gap = box[0] - (last[0] + last[2])
            if same_line and same_size and 0 <= gap <= max_gap * width:
                run.append(box)
                continue
        fields.append([box])
    return fields


def propose_template(blank: np.ndarray, dpi: float, limits: BoxLimits = BoxLimits()) -> tuple[list[Field], list[Field]]:
    """Propose fields from a blank form: (fields, candidates), named field_1, field_2, ... in
    reading order. Fields: its digit boxes, grouped, each with the format its printed separators
    give (`printed_format`) and, where that is a date's, a date's pattern (`date_pattern`); and
    free fields (`free_field_areas`): empty boxes wider than a digit's and short guide lines with
    room to write on. Candidates: longer guide lines, where a number may be written or a name (a
    person decides)."""
    digit_boxes = find_boxes(blank, dpi, limits, blank=True)
    ticked = [c for c in find_tick_cells(blank, dpi, limits) if not any(overlaps(c, b) for b in digit_boxes)]
    digit_boxes = sort_reading_order(digit_boxes + ticked)
    areas, lines = free_field_areas(blank, dpi, digit_boxes)
    groups: list = group_fields(digit_boxes) + [[a] for a in areas]
    order = {box: i for i, box in enumerate(sort_reading_order([g[0] for g in groups]))}
    groups.sort(key=lambda g: order[g[0]])  # reading order of their first boxes
    fields = [_boxed_field(blank, g) if g[0] not in areas else Field("", kind="free", box=g[0]) for g in groups]
    named = [replace(f, name=f"field_{i}") for i, f in enumerate(fields, start=1)]
    return named, [Field(f"field_{len(named) + i}", kind="free", box=b) for i, b in enumerate(lines, start=1)]


def _boxed_field(blank: np.ndarray, cells: list[Box]) -> Field:
    """A proposed field of boxes: its printed format, and a date's pattern where that is a date's."""
    layout = printed_format(blank, cells)
    return Field("", tuple(cells), format=layout, pattern=date_pattern(layout))


def free_field_areas(blank: np.ndarray, dpi: float, digit_boxes: list[Box]) -> tuple[list[Box], list[Box]]:
    """Where a number may be written freely on a blank form: (areas, long lines). Areas: empty
    rectangles at least a quarter of an inch high and wider than a digit's box, and guide lines
    of 1 to 2 inches with room above (the area above the line, a third of an inch high). Long
    lines: guide lines longer than that (a name's, a memo's, or an amount's: a person decides).
    blank: (H, W) uint8; digit_boxes: the form's digit boxes, which are not free fields."""
    wide = find_boxes(blank, dpi, BoxLimits(min_side=0.25, max_side=8.0, max_aspect=16.0))
    areas = [b for b in wide if b[2] > 1.0 * dpi or b[2] > 2.2 * b[3]]
    areas = [b for b in areas if not any(overlaps(b, d) for d in digit_boxes)]
    ink = (blank < 128).astype(np.uint8)
    runs = cv2.morphologyEx(ink, cv2.MORPH_OPEN, np.ones((1, int(dpi)), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(runs, connectivity=8)
    height, below = round(0.35 * dpi), round(0.04 * dpi)
    short, long = [], []
    for x, y, w, h, _ in stats[1:]:
        box = (int(x), int(y) - height, int(w), height + below)
        if h > 0.05 * dpi or box[1] < 0 or any(overlaps(box, b) for b in [*areas, *digit_boxes]):
            continue  # a thick bar, the edge of a box, or no room above
        if ink[box[1] : y - 2, x : x + w].mean() > 0.02:
            continue  # print above: a table's rule or an underline, not a line to write on
        (short if w <= 2 * dpi else long).append(box)
    return areas + short, long


# Boxes printed as a date: two, two, then two or four, one separator between the groups.
DATE_FORMAT = re.compile(r"##([/.-])##\1(##|####)")
DAY, MONTH = r"(0[1-9]|[12]\d|3[01])", r"(0[1-9]|1[0-2])"


def date_pattern(layout: str) -> str:
    """The pattern a proposed template gives boxes whose printed format (`layout`, as
    printed_format gives it) is a date's (DATE_FORMAT): a day and a month that exist, in either
    order (forms differ by country), and a year of two digits or 1900-2099; '' for any other
    format. It rules out most of what a doubtful box could be (no day or month starts with 7),
    which makes the reading surer or corrects it (fields.read_field)."""
    match = DATE_FORMAT.fullmatch(layout)
    if not match:
        return ""
    year = r"\d\d" if len(match.group(2)) == 2 else r"(19|20)\d\d"
    return rf"({DAY}{MONTH}|{MONTH}{DAY}){year}"


def printed_format(blank: np.ndarray, cells: list[Box]) -> str:
    """The format of a run of boxes: '#' per box and, in each gap wider than the field's usual
    one, the mark printed there, told by its shape against the boxes' height: a dot or comma
    low down ('.'), a short bar at mid-height ('-'), a tall stroke ('/'). '' when no gap holds
    a mark. blank: (H, W) uint8 blank form; cells: the run's interiors, left to right."""
    gaps = [b[0] - (a[0] + a[2]) for a, b in zip(cells, cells[1:])]
    if not gaps:
        return ""
    usual = float(np.median(gaps))
    out, marked = "#", False
    for (a, b), gap in zip(zip(cells, cells[1:]), gaps):
        mark = _gap_mark(blank, a, b) if gap > usual + 0.25 * a[3] else ""
        marked |= bool(mark)
        out += mark + "#"
    return out if marked else ""


def _gap_mark(blank: np.ndarray, left: Box, right: Box) -> str:
    """The separator printed between two boxes, or '' (see printed_format)."""
    h = max(left[3], right[3])
    line = max(2, round(0.15 * h))  # keep clear of the boxes' own lines
    x0, x1 = left[0] + left[2] + line, right[0] - line
    y0, y1 = min(left[1], right[1]), max(left[1] + left[3], right[1] + right[3])
    if x1 - x0 < 2:
        return ""
    ink = (blank[y0:y1, x0:x1] < 128).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    if count < 2:
        return ""
    x, y, w, hh, _ = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
    if hh >= 0.45 * h:
        return "/"
    if w >= 1.5 * hh and 0.25 * h <= y + hh / 2 <= 0.75 * h:
        return "-"
    if y + hh / 2 > 0.6 * h:
        return "."
    return ""


def _field_doc(f: Field) -> dict:
    """A field as its template entry."""
    doc: dict = {"name": f.name}
    if f.kind == "free":
        doc.update(kind="free", box=list(f.box))
        doc.update({k: getattr(f, k) for k in ("length", "min_length", "max_length") if getattr(f, k) is not None})
        doc.update({"optional": True} if f.optional else {})
        doc.update({"separators": f.separators} if f.separators else {})
        doc.update({"pattern": f.pattern} if f.pattern else {})
        doc.update({"check": f.check} if f.check else {})
    else:
        doc.update({"length": f.length} if f.length is not None else {})
        doc.update({"optional": True} if f.optional else {})
        doc.update({"format": f.format} if f.format else {})
        doc.update({"numeric": True} if f.numeric else {})
        doc.update({"pattern": f.pattern} if f.pattern else {})
        doc.update({"check": f.check} if f.check else {})
        doc["cells"] = [list(c) for c in f.cells]
    return doc


def template_yaml(fields: list[Field], reference: str, dpi: float, name: str, candidates: list[Field] = ()) -> str:
    """The YAML text of a template, written by the YAML library (so any name or pattern is
    quoted as it must be); lists of numbers (cells, boxes) on one line each, as people edit them.
    A dpi within half a unit of a whole number is written whole (150, not 150.012). Candidate
    fields follow, commented out, for a person to uncomment."""
    import yaml

    docs = [_field_doc(f) for f in fields]
    whole = round(dpi)
    template = {"name": name, "reference": reference, "dpi": whole if abs(dpi - whole) < 0.5 else float(dpi), "fields": docs}
    text = yaml.safe_dump(template, default_flow_style=None, sort_keys=False, allow_unicode=True, width=120)
    if candidates:
        more = yaml.safe_dump([_field_doc(f) for f in candidates], default_flow_style=None, sort_keys=False, width=120)
        text += "# Lines with room to write on: uncomment those that are fields (and name them).\n"
        text += "".join(f"# {line}\n" for line in more.splitlines())
    return text
