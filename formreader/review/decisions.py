"""The review station's bookkeeping: the fields a person should check, and their decisions.

A decision is kept the moment it is made, as one line of an append-only journal
(`results.reviews.jsonl`, flushed to disk), and then written into the results' CSVs: a killed
server or a closed tab loses nothing, reopening resumes at the first field not yet decided, and
a later `process --resume` of the same batch writes the decisions into its CSVs again. The last
decision on a field counts (going back and deciding again adds a line). A decision is about one
reading: if a later run reads the field differently, the decision no longer applies and the
field waits for a person again.

Nothing here knows about the web: formreader.review.server serves these functions to the browser.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from formreader.export import JournalIndex
from formreader.reading.locate import cell_crop, cell_interior
from formreader.reading.segment import segment_digit

ACTIONS = {"confirm": "confirmed", "correct": "corrected", "unreadable": "unreadable"}
# What a person may type as a field's value: the number as written (digits, and the marks that
# print between them), or nothing.
VALUE = re.compile(r"([0-9][0-9.,/: -]{0,63})?")


class ReviewError(ValueError):
    """A decision that cannot be taken (unknown field, bad value); the message says why."""


def field_key(source: str, page: int, field: str) -> str:
    """One field of one page, as the station and its journal name it."""
    return json.dumps([source, int(page), field], ensure_ascii=True)


def load_decisions(path: Path) -> dict[str, dict]:
    """The decisions in a review journal, the last one per field: {field_key: decision}."""
    decisions: dict[str, dict] = {}
    if not Path(path).exists():
        return decisions
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                d = json.loads(line)
                decisions[field_key(d["file"], d["page"], d["field"])] = d
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    return decisions


def apply_decisions(records: Iterable[dict], decisions: dict[str, dict]) -> Iterator[dict]:
    """Page records with each decided field's final status, reviewed value, reviewer and time,
    as they are taken (new dicts; the records given are not changed). A decision made on
    another reading than the record's is left out."""
    by_field = _by_field(decisions)
    for rec in records:
        fields = []
        for f in rec.get("fields", []):
            d = by_field.get((rec["source"], rec["page"], f["field"]))
            if d is not None and d.get("read") == f["value"]:
                decided = {"reviewed_value": d["value"], "reviewed_by": d["by"], "reviewed_at": d["at"]}
                f = {**f, "status": ACTIONS[d["action"]], "machine_status": f["status"], **decided}
            fields.append(f)
        yield {**rec, "fields": fields}


def _by_field(decisions: dict[str, dict]) -> dict[tuple[str, int, str], dict]:
    """The decisions by (source, page, field): field_key's JSON for every field of a large batch
    cost more than the rest."""
    return {(d["file"], int(d["page"]), d["field"]): d for d in decisions.values()}


def field_of(record: dict | None, name: str) -> dict | None:
    """A page record's field by its name; None where there is no such record or field."""
    return next((f for f in (record or {}).get("fields", []) if f["field"] == name), None)


def find_field(records: list[dict], source: str, page: int, field: str) -> dict:
    """A field's record in the page records; ReviewError when the results have no such field."""
    for r in records:
        found = field_of(r, field) if (r["source"], r["page"]) == (source, page) else None
        if found is not None:
            return found
    raise ReviewError(f"no field {field!r} on page {page} of {source!r} in these results")


def decide(records: list[dict], source: str, page: int, field: str, action: str, value: str, by: str) -> dict:
    """A person's decision on one field, checked against the records: a dict for the journal.

    action: 'confirm' (the reading is right), 'correct' (`value` is what is written, as
    written: '923.15') or 'unreadable'. Raises ReviewError for a field the results do not have,
    an unknown action or a value that is not a number as written."""
    if action not in ACTIONS:
        raise ReviewError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    found = find_field(records, source, page, field)
    if action == "confirm":
        value = found.get("text") or found["value"]
    elif action == "unreadable":
        value = ""
    elif not VALUE.fullmatch(value or ""):
        raise ReviewError(f"a value is the number as written (digits, and . , / : - between them), not {value!r}")
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    read = found["value"]
    return {"file": source, "page": page, "field": field, "action": action, "value": value, "read": read, "by": by, "at": at}


def record_decision(path: Path, decision: dict) -> None:
    """Append a decision to the review journal and flush it to disk before anything else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(decision) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def labelled_cells(field: dict, picture: np.ndarray, text: str) -> list[tuple[int, np.ndarray, str]]:
    """The digits of a boxed field a person confirmed or corrected, as training examples:
    [(cell index, (28, 28) float32 image as the model sees it, label)].

    field: its record (with its located `cells`); picture: (H, W) uint8, its page registered to
    the template (the page picture process keeps); text: the decided number as written. Each
    digit of `text` labels, in order, the cells the reading found ink in; when their counts
    differ (a digit in a cell read as blank), which cell holds which digit is not known and
    nothing is returned. Free fields give nothing (their digits have no boxes of their own)."""
    cells, digits = field.get("cells") or [], [d[0] for d in field.get("digits", [])]
    written = [c for c in text if c.isdigit()]
    inked = [i for i, d in enumerate(digits) if d != ""]
    if field.get("raw") or len(cells) != len(digits) or len(written) != len(inked):
        return []
    out = []
    for i, label in zip(inked, written):
        box = tuple(cells[i])
        seg = segment_digit(cell_crop(picture, box), interior=cell_interior(picture.shape, box))
        if seg.image is not None:
            out.append((i, seg.image, label))
    return out


def review_list(index: JournalIndex, field: str | None = None) -> list[tuple[str, int, str]]:
    """What the station shows, in order, as (source, page, field): every field the run flagged
    (decided or not), least confident first; or, with `field`, that field on every page that has
    it, in reading order (to check one field across a batch). From the journal's index alone."""
    if field is None:
        return [(source, page, name) for source, page, name, _ in index.flagged]
    return [(source, page, field) for (source, page), names in index.page_fields.items() if field in names]


def review_progress(index: JournalIndex, decisions: dict[str, dict], keys: list[tuple[str, int, str]]) -> tuple[int, int]:
    """How many of a review list's fields (`keys`, review_list) a decision holds for, and the
    position of the first that has none (len(keys) when all have). The flagged fields' readings
    are in the index; of other fields only the pages a decision was made on are read."""
    by_field = _by_field(decisions)
    flagged = {(source, page, name): value for source, page, name, value in index.flagged}

    def reading(key: tuple[str, int, str]) -> str | None:
        if key in flagged:
            return flagged[key]
        found = field_of(index.record(key[0], key[1]), key[2])
        return None if found is None else found["value"]

    holds = [k in by_field and by_field[k].get("read") == reading(k) for k in keys]
    return sum(holds), next((i for i, h in enumerate(holds) if not h), len(keys))


def review_window(
    index: JournalIndex, decisions: dict[str, dict], keys: list[tuple[str, int, str]], start: int, count: int
) -> list[dict]:
    """The fields at positions [start, start + count) of a review list, each as its page's record
    has it with the decisions applied (apply_decisions), with its `source` and `page`. Each page
    is read from the journal once; a field the journal no longer has is left out."""
    wanted = keys[start : start + count]
    pages = {(source, page): index.record(source, page) for source, page, _ in wanted}
    records = {(r["source"], r["page"]): r for r in apply_decisions((r for r in pages.values() if r), decisions)}
    found = ((field_of(records.get((source, page)), name), source, page) for source, page, name in wanted)
    return [{**f, "source": source, "page": page} for f, source, page in found if f is not None]
