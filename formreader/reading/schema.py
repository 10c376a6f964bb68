"""The template file's schema: what a template YAML may hold (pydantic models, published as
`templates/template.schema.json` for editors and other tools), and the checks a schema cannot
state (cells inside the reference image, no two cells overlapping, one # of a format per cell,
a length no longer than the cells, each name once, a dpi that agrees with the image's own).
Every problem is reported at once, each with its line in the file and the field it is in.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError, conlist
from pydantic import Field as Rule

from formreader.reading.locate import overlaps
from formreader.reading.template import DOCUMENTS

FORMAT_MARKS = " .,-/:"  # what a format may print between boxes
# The wide sheet's own columns (formreader.export): a field of one of these names would overwrite them.
RESERVED_NAMES = ("file", "page", "review", "template")

Name = Annotated[str, Rule(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="an identifier: letters, digits, _")]
BoxDoc = Annotated[conlist(int, min_length=4, max_length=4), Rule(description="[x, y, width, height], reference pixels")]
Digits = Annotated[int, Rule(ge=1, le=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BoxesField(_Strict):
    """A number written one digit per box."""

    name: Name
    kind: Literal["boxes"] = "boxes"
    cells: conlist(BoxDoc, min_length=1) = Rule(description="each box's inside, left to right")
    length: Digits | None = Rule(None, description="exactly this many digits")
    optional: bool = False
    format: Annotated[str, Rule(pattern=r"^[# .,\-/:]*$", description="'#' a box, and the marks printed between")] = ""
    numeric: bool = Rule(False, description="a quantity: a number cell in workbooks")
    pattern: str = Rule("", description="a regular expression the digits read (blank boxes left out) must match")
    check: Literal["", "luhn"] = Rule("", description="a check digit the digits read must pass: 'luhn' (mod 10)")


class FreeField(_Strict):
    """A number written freely in one box or on a guide line."""

    name: Name
    kind: Literal["free"]
    box: BoxDoc
    length: Digits | None = None
    min_length: Digits | None = None
    max_length: Digits | None = None
    optional: bool = False
    separators: bool | Annotated[str, Rule(pattern=r"^[.,\-/]*$")] = Rule("", description="true: any of . , - /")
    pattern: str = Rule("", description="a regular expression the whole reading must match")
    check: Literal["", "luhn"] = Rule("", description="a check digit the digits read must pass: 'luhn' (mod 10)")


def _kind(doc) -> str:
    return doc.get("kind", "boxes") if isinstance(doc, dict) else "boxes"


class TemplateFile(_Strict):
    """A formreader template: a blank form's picture and its fields."""

    name: str | None = None
    reference: str = Rule(description="the blank form's image, relative to the template")
    dpi: float = Rule(150, ge=50, le=1200, description="the reference image's resolution")
    review_risk: float | None = Rule(
        None,
        gt=0,
        le=0.5,
        description="the share of fields that may be let out wrong but ok (default: the models' own, 0.003)",
    )
    document: Literal[DOCUMENTS] = Rule(
        "form",
        description="the kind of paper: review_risk is held on validation fields of that kind (free fields' "
        "thresholds chosen on forms' or on bank checks' fields by `formreader calibrate-strings`)",
    )
    fields: conlist(
        Annotated[Annotated[BoxesField, Tag("boxes")] | Annotated[FreeField, Tag("free")], Discriminator(_kind)],
        min_length=1,
    )


def schema_json() -> str:
    """The JSON Schema of a template file, as published in templates/template.schema.json."""
    return json.dumps(TemplateFile.model_json_schema(), indent=2) + "\n"


def structure_problems(doc, node: yaml.Node | None) -> list[str]:
    """What the schema refuses in a parsed template (`doc`; `node`: its YAML node tree, for line
    numbers): one message per problem, 'line N: field 'NAME': ...'."""
    try:
        TemplateFile.model_validate(doc)
    except ValidationError as e:
        return [_message(doc, node, err) for err in e.errors()]
    return []


def layout_problems(doc: dict, node: yaml.Node | None, shape: tuple[int, int], image_dpi: float | None) -> list[str]:
    """What no schema can state, in a template that passed it; `shape` (H, W) and `image_dpi`
    (None when the file does not say) of its reference image."""
    problems: list[str] = []
    height, width = shape
    dpi = float(doc.get("dpi", 150))
    if image_dpi and abs(image_dpi - dpi) > 0.03 * dpi:
        problems.append(f"{_line(node, ('dpi',))}'dpi' is {dpi:g} but the reference image says {image_dpi:.0f} DPI")
    names = [f["name"] for f in doc["fields"]]
    seen: dict[tuple, str] = {}
    for i, f in enumerate(doc["fields"]):
        where = f"{_line(node, ('fields', i))}field '{f['name']}': "
        if f["name"].lower() in RESERVED_NAMES:
            problems.append(f"{where}the name '{f['name']}' is taken by a column of the results "
                            f"({', '.join(RESERVED_NAMES)}): rename the field")
        if names.count(f["name"]) > 1 and names.index(f["name"]) < i:
            problems.append(f"{where}name used more than once")
        if f.get("kind") == "free":
            boxes = [("box", ("box",), f["box"])]
        else:
            boxes = [(f"cells[{j}]", ("cells", j), c) for j, c in enumerate(f["cells"])]
        for label, loc, (x, y, w, h) in boxes:
            at = f"{_line(node, ('fields', i, *loc))}field '{f['name']}': "
            if w < 4 or h < 4:
                problems.append(f"{at}{label} is too small ({w}x{h} px)")
            elif x < 0 or y < 0 or x + w > width or y + h > height:
                problems.append(f"{at}{label} {[x, y, w, h]} lies outside the reference image ({width}x{height} px)")
            for box, other in seen.items():
                if overlaps((x, y, w, h), box):
                    what = "is the same box as" if (x, y, w, h) == box else "overlaps"
                    problems.append(f"{at}{label} {[x, y, w, h]} {what} {other}")
                    break
            seen[(x, y, w, h)] = f"{label} of field '{f['name']}'"
        try:
            re.compile(f.get("pattern", ""))
        except re.error as e:
            problems.append(f"{where}'pattern' is not a regular expression ({e}): {f['pattern']!r}")
        printed = next((m for m in ("/", ",", ":", r"\.", r"\-") if m in f.get("pattern", "")), None)
        if f.get("kind") != "free" and printed:
            problems.append(f"{where}'pattern' is matched against the digits read, without the marks printed "
                            f"between the boxes: it cannot hold '{printed[-1]}' ({f['pattern']})")
        if f.get("kind") == "free":
            low, high = f.get("min_length"), f.get("max_length")
            if low and high and low > high:
                problems.append(f"{where}'min_length' is larger than 'max_length'")
            continue
        n = len(f["cells"])
        if f.get("length") is not None and f["length"] > n:
            problems.append(f"{where}'length' must be an integer from 1 to {n} (its cells), not {f['length']!r}")
        form = f.get("format", "")
        if form and form.count("#") != n:
            problems.append(f"{where}'format' must have one # per cell ({n}) and between them only some of "
                            f"{FORMAT_MARKS.strip()} or spaces (as '##/##/####'), not {form!r}")
    return problems


def _message(doc, node, err: dict) -> str:
    loc = [p for p in err["loc"] if p not in ("boxes", "free")]  # the union's tags are not in the file
    where = _line(node, tuple(loc))
    if loc and loc[0] == "fields" and len(loc) > 1 and isinstance(loc[1], int):
        entry = doc["fields"][loc[1]] if isinstance(doc.get("fields"), list) and loc[1] < len(doc["fields"]) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where += f"field '{name}': " if isinstance(name, str) else f"fields[{loc[1]}]: "
        loc = loc[2:]
    key = loc[0] if loc else None
    given = err.get("input")
    if err["type"] == "missing":
        return f"{where}missing '{key}'"
    if err["type"] == "extra_forbidden":
        return f"{where}unknown key(s) {key}"
    if key in ("cells", "box"):
        label = f"cells[{loc[1]}]" if key == "cells" and len(loc) > 1 else key
        shown = given if len(loc) <= 2 else (doc_at(doc, err["loc"][:-1]) if err["loc"] else given)
        return f"{where}{label} must be four integers [x, y, w, h], not {shown!r}"
    if key == "name":
        return f"{where}'name' must be an identifier (letters, digits, _), not {given!r}"
    if key == "dpi":
        return f"{where}'dpi' must be a number between 50 and 1200, not {given!r}"
    if key == "fields" and len(loc) == 1:
        return f"{where}'fields' must be a non-empty list of fields"
    if key == "kind":
        return f"{where}'kind' must be 'boxes' or 'free', not {given!r}"
    if key == "format":
        marks = FORMAT_MARKS.strip()
        return f"{where}'format' must have one # per cell and between them only some of {marks} or spaces, not {given!r}"
    if key == "check":
        return f"{where}'check' must be 'luhn' (a Luhn mod 10 check digit) or left out, not {given!r}"
    if key == "separators":
        return f"{where}'separators' must be true, false or some of . , - / (as \".,\"), not {given!r}"
    return f"{where}'{key}': {err['msg'].lower()}, not {given!r}" if key else f"{where}{err['msg']}"


def doc_at(doc, loc) -> object:
    """The value at a pydantic location in the parsed document (tags skipped), or None."""
    for part in loc:
        if part in ("boxes", "free"):
            continue
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def _line(node: yaml.Node | None, loc: tuple) -> str:
    """'line N: ' for the deepest node of `loc` the YAML tree has (nothing without a tree)."""
    found = node
    for part in loc:
        child = None
        if isinstance(found, yaml.MappingNode):
            child = next((v for k, v in found.value if k.value == part), None)
        elif isinstance(found, yaml.SequenceNode) and isinstance(part, int) and part < len(found.value):
            child = found.value[part]
        if child is None:
            break
        found = child
    return f"line {found.start_mark.line + 1}: " if found is not None else ""
