"""Export: page records -> table rows -> CSV files written atomically (and pandas frames for the API).

For `--out results.csv` four files are written side by side:
- results.csv         one row per field per page: file, page, field, value, confidence, status, reasons,
                      raw (free-written fields: the number with its separators, e.g. 1.234,56)
- results.digits.csv  one row per cell: the digit read and its confidence
- results.wide.csv    one row per page, a column per field (for spreadsheets)
- results.errors.csv  one row per file or page that could not be read, with the reason
Values are digit strings: leading zeros are kept (read them back with dtype=str).

The set is written whole: the four files are written beside their places first, then moved
in, and results.manifest.json (written last) names the SHA-256 of each, so a reader can tell a
complete set from one a crash cut short. A lock file keeps a second run off the same --out.
File names that are not UTF-8 are written with their odd bytes as \\xNN escapes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from formreader.reading.classify import file_sha256

if TYPE_CHECKING:  # pandas is imported where tables are made: the page workers never need it
    import pandas as pd

FIELD_COLUMNS = [
    "file", "page", "field", "value", "text", "confidence", "status", "reasons", "raw", "registration_quality",
    "reviewed_value", "reviewed_by", "reviewed_at", "template",
]
# A field's status: the machine's ('ok', 'review'), or a person's decision at the review station.
REVIEWED = ("confirmed", "corrected", "unreadable")
DIGIT_COLUMNS = ["file", "page", "field", "cell", "digit", "confidence"]
ERROR_COLUMNS = ["file", "page", "error"]


def display_path(source: str) -> str:
    """A file name as text: bytes that are not UTF-8 (a name written on another system, which
    Python holds as surrogates) shown as \\xNN escapes."""
    try:
        return os.fsencode(source).decode("utf-8", "backslashreplace")
    except (UnicodeError, TypeError):
        return str(source)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def as_text(value: str) -> str:
    """A cell a spreadsheet will never run as a formula: text starting with = + - @ (or a tab or
    carriage return) gets a leading apostrophe, as OWASP advises against CSV injection (a file
    named '=HYPERLINK(...).png', a raw reading '-1-1')."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def final_value(field) -> str:
    """What a field holds, as written: the person's value where one was given, else the reading
    as written (`text`; records and CSVs of older runs have only `value`). A dict or a row."""
    if field.get("status") in REVIEWED:
        return field.get("reviewed_value", "")
    return field.get("text") or field["value"]


def record_rows(rec: dict) -> tuple[list[dict], list[dict], dict | None, dict | None]:
    """A page record's rows of each table (pipeline.page_record, with a person's decisions where
    formreader.review.decisions put them): (fields, digits, its wide row, its error row); an
    unreadable page has an error row only, a read page no error row."""
    source = as_text(display_path(rec["source"]))
    if rec.get("error"):
        return [], [], None, {"file": source, "page": rec["page"], "error": as_text(rec["error"])}
    fields, digits = [], []
    wide = {"file": source, "page": rec["page"], "template": rec.get("template", "")}
    flagged = []
    for f in rec["fields"]:
        fields.append(
            {
                "file": source,
                "page": rec["page"],
                "field": f["field"],
                "value": f["value"],
                "text": as_text(f.get("text", f["value"])),
                "confidence": round(f["confidence"], 4),
                "status": f["status"],
                "reasons": as_text("; ".join(f["reasons"])),
                "raw": as_text(f.get("raw", "")),
                "registration_quality": rec.get("quality"),
                "reviewed_value": f.get("reviewed_value", ""),
                "reviewed_by": as_text(f.get("reviewed_by", "")),
                "reviewed_at": f.get("reviewed_at", ""),
                "template": rec.get("template", ""),
            }
        )
        for i, (digit, conf, *_) in enumerate(f["digits"], start=1):
            digit_row = {"file": source, "page": rec["page"], "field": f["field"], "cell": i, "digit": digit}
            digits.append({**digit_row, "confidence": round(conf, 4)})
        wide[f["field"]] = as_text(final_value(f))
        if f["status"] == "review":
            flagged.append(f["field"])
    wide["review"] = " ".join(flagged)
    return fields, digits, wide, None


def results_frames(records: Iterable[dict]) -> dict[str, pd.DataFrame]:
    """Tables 'fields', 'digits', 'wide' and 'errors' from page records (record_rows) and, when
    the pages are of several forms, 'wide.NAME' for each form's pages alone: the tables
    write_results writes, in memory. The wide table holds each field's final value; its
    'review' column names the fields still waiting for a person."""
    import pandas as pd

    fields, digits, errors, wide = [], [], [], []
    for rec in records:
        rows = record_rows(rec)
        fields += rows[0]
        digits += rows[1]
        wide += [rows[2]] if rows[2] else []
        errors += [rows[3]] if rows[3] else []
    forms = list(dict.fromkeys(row["template"] for row in wide))
    frames = {
        "fields": pd.DataFrame(fields, columns=FIELD_COLUMNS).astype(
            {"value": str, "text": str, "reasons": str, "raw": str, "reviewed_value": str, "reviewed_by": str, "reviewed_at": str}
        ),
        "digits": pd.DataFrame(digits, columns=DIGIT_COLUMNS).astype({"digit": str}),
        "wide": pd.DataFrame(wide, columns=_wide_columns((k for row in wide for k in row), len(forms))),
        "errors": pd.DataFrame(errors, columns=ERROR_COLUMNS),
    }
    for form in forms if len(forms) > 1 else []:  # a sheet of each form's own columns
        own = [row for row in wide if row["template"] == form]
        frames[f"wide.{form}"] = pd.DataFrame(own, columns=_wide_columns((k for row in own for k in row), len(forms)))
    return frames


def _wide_columns(keys: Iterable[str], forms: int) -> list[str]:
    """The wide table's columns: its rows' keys in the order they first appear, 'review' last;
    'template' only when the batch holds several forms (one form: the column says nothing)."""
    keys = dict.fromkeys(["file", "page", *keys])
    return [k for k in keys if k != "review" and (k != "template" or forms > 1)] + ["review"]


def _beside(out: Path, ending: str) -> Path:
    """A companion file of `out`: results.csv -> results<ending>."""
    return Path(out).with_name(Path(out).stem + ending)


def output_paths(out: Path) -> dict[str, Path]:
    return {
        "fields": Path(out),
        "digits": _beside(out, ".digits.csv"),
        "wide": _beside(out, ".wide.csv"),
        "errors": _beside(out, ".errors.csv"),
    }


def journal_path_for(out: Path) -> Path:
    """Where a run writing `out` records its pages as they finish (formreader.pipeline.Journal)."""
    return _beside(out, ".journal.jsonl")


def _journal_entries(path: Path, start: int = 0) -> Iterator[tuple[int, str, dict]]:
    """A journal's whole lines from byte `start` on, each with its byte offset and what it says;
    a line cut short by a crash is left out."""
    with open(path, "rb") as fh:
        fh.seek(start)
        offset = start
        for raw in fh:
            at, offset = offset, offset + len(raw)
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if raw.endswith(b"\n") and isinstance(rec, dict):
                yield at, raw.decode("utf-8"), rec


def journal_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """A journal's whole lines, each with what it says; a line cut short by a crash is left out."""
    return ((line, rec) for _, line, rec in _journal_entries(path))


def journal_settings(path: Path) -> dict:
    """The settings a run's journal records (its first 'run' line): what decided its results."""
    return next((rec for _, rec in journal_lines(path) if rec.get("kind") == "run"), {}).get("settings", {})


def journal_records(path: Path) -> Iterator[dict]:
    """The page records (and unreadable files' records) in a run's journal, in the order
    they were recorded, read from disk as they are taken."""
    return (rec for _, rec in journal_lines(path) if rec.get("kind") == "page")


class JournalIndex:
    """Where each page's record lies in a run's journal, so that one page is read back from disk
    when it is asked for and the batch is never held in memory (a page's record is about 20 KiB
    as Python objects, its place here about 0.2). Also what the review station lists without
    reading records: the batch's field names in the order they first appear, each page's field
    names, the fields the run flagged (least confident first, with their readings) and the
    pictures of the pages that were read (not unreadable). A journal changed since it was indexed
    (a `process --resume` rewrites it) is indexed again before it is read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stamp: tuple[int, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Index the journal again if it changed since it was last indexed."""
        info = os.stat(self.path)
        if (info.st_size, info.st_mtime_ns) == self.stamp:
            return
        offsets: dict[tuple[str, int], int] = {}
        page_fields: dict[tuple[str, int], tuple[str, ...]] = {}
        forms: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple of names shared by a form's pages
        flagged: dict[tuple[str, int], list[tuple[float, str, str]]] = {}
        read: set[tuple[str, int]] = set()
        for at, _, rec in _journal_entries(self.path):
            if rec.get("kind") != "page":
                continue
            key = (rec["source"], rec["page"])
            offsets[key] = at  # a page recorded twice counts as its last record
            fields = rec.get("fields", [])
            names = tuple(f["field"] for f in fields)
            page_fields[key] = names = forms.setdefault(names, names)
            flagged[key] = [(f["confidence"], name, f["value"]) for name, f in zip(names, fields) if f["status"] != "ok"]
            (read.discard if rec.get("error") else read.add)(key)
        order = sorted(((c, key, name, value) for key, found in flagged.items() for c, name, value in found), key=lambda x: x[0])
        # Assigned whole, each at once: a request in another thread sees the old index or the new.
        self.offsets, self.page_fields = offsets, page_fields
        self.fields = list(dict.fromkeys(name for names in forms for name in names))
        self.flagged = [(*key, name, value) for _, key, name, value in order]
        self.pictures = {view_name(*key) for key in read}
        self.stamp = (info.st_size, info.st_mtime_ns)

    def record(self, source: str, page: int) -> dict | None:
        """The record of one page, read from the journal; None when the journal has no such page."""
        self.refresh()
        at = self.offsets.get((source, page))
        entry = None if at is None else next(_journal_entries(self.path, at), None)
        return entry[2] if entry and (entry[2].get("source"), entry[2].get("page")) == (source, page) else None


def manifest_path(out: Path) -> Path:
    return _beside(out, ".manifest.json")


def views_path_for(out: Path) -> Path:
    """The folder of the registered page pictures a run keeps for the review station."""
    return _beside(out, ".pages")


def reviews_path_for(out: Path) -> Path:
    """The review station's append-only record of a person's decisions (formreader.review.decisions)."""
    return _beside(out, ".reviews.jsonl")


def corrections_path_for(out: Path) -> Path:
    """The folder of labelled digit crops a person's decisions give (LABEL/NAME.png), for
    `formreader train --extra`."""
    return _beside(out, ".corrections")


def view_name(source: str, page: int) -> str:
    """The file name of a page's picture in the views folder: a digest of where the page came
    from, so that any file name (odd bytes, slashes, formula characters) gives a plain one."""
    key = f"{source}\0{page}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest()[:24] + ".jpg"


def write_atomically(path: Path, data: bytes) -> None:
    """Write bytes to `path` so that it is either the old file or the whole new one."""
    tmp = _write_temp(Path(path), lambda fh: fh.write(data), binary=True)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _temp_file(path: Path, binary: bool = False) -> Iterator[tuple[IO, Path]]:
    """A file to write beside `path` (hidden, .tmp): (file, its path). Flushed to disk when the
    block ends, with the permissions the user's umask gives new files; removed if the block
    fails. Text is UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, suffix=".tmp", dir=path.parent)
    text = {} if binary else {"newline": "", "encoding": "utf-8", "errors": "backslashreplace"}
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **text) as fh:
            yield fh, Path(tmp)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_temp(path: Path, write, binary: bool = False) -> Path:
    """Write a file beside `path` (_temp_file) with `write(fh)`; returns its path."""
    with _temp_file(Path(path), binary) as (fh, tmp):
        write(fh)
    return tmp


def remove_stale_temps(out: Path) -> None:
    """Remove what a run killed while writing left behind (hidden .tmp files of our outputs)."""
    for path in [*output_paths(out).values(), manifest_path(out)]:
        for stale in path.parent.glob("." + path.name + "*.tmp"):
            stale.unlink(missing_ok=True)


class OutputLock:
    """An exclusive lock on an --out for the length of a run: a second run on the same results
    is refused instead of silently overwriting the first one's (or being overwritten)."""

    def __init__(self, out: Path):
        self.path = Path(out).with_name("." + Path(out).name + ".lock")

    def __enter__(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise OutputBusyError(f"another formreader run is writing {Path(self.path.name[1:-5])} (lock {self.path})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        self._fh.close()


class OutputBusyError(RuntimeError):
    """Another run holds the lock on these results."""


def write_results(records: Iterable[dict], out: Path) -> dict[str, Path]:
    """Write the four CSVs for `out` (and results.wide.FORM.csv for each form of a mixed batch)
    and the manifest naming them; returns their paths by table name.

    The records stream through once (a generator will do): each page's rows are written as it
    comes, and the wide tables' rows wait in a scratch file until their columns are known, so
    memory does not grow with the batch."""
    paths = output_paths(out)
    remove_stale_temps(out)
    temps: dict[str, Path] = {}
    keys: dict[str, None] = {}  # the wide rows' keys, in order of first appearance
    forms: dict[str, dict[str, None]] = {}  # each form's own
    count = 0
    try:
        with ExitStack() as stack:
            tables = {}
            for name, columns in (("fields", FIELD_COLUMNS), ("digits", DIGIT_COLUMNS), ("errors", ERROR_COLUMNS)):
                fh, temps[name] = stack.enter_context(_temp_file(paths[name]))
                tables[name] = _csv_table(fh, columns)
            spool = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8", dir=Path(out).parent))
            for rec in records:
                count += 1
                fields, digits, wide, error = record_rows(rec)
                tables["fields"].writerows(fields)
                tables["digits"].writerows(digits)
                tables["errors"].writerows([error] if error else [])
                if wide:
                    keys.update(dict.fromkeys(wide))
                    forms.setdefault(wide["template"], {}).update(dict.fromkeys(wide))
                    spool.write(json.dumps(wide) + "\n")
            # The wide tables: all pages, and each form's own when the batch holds several.
            wide_tables = {"wide": (None, keys)}
            if len(forms) > 1:
                wide_tables.update({f"wide.{form}": (form, own) for form, own in forms.items()})
            for name, (form, own) in wide_tables.items():
                paths[name] = paths.get(name) or _beside(out, "." + re.sub(r"[^\w.-]", "_", name) + ".csv")
                with _temp_file(paths[name]) as (fh, temps[name]):
                    table = _csv_table(fh, _wide_columns(own, len(forms)))
                    spool.seek(0)
                    for line in spool:
                        row = json.loads(line)
                        if form is None or row["template"] == form:
                            table.writerow(row)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    manifest = {"files": {paths[name].name: file_sha256(tmp) for name, tmp in temps.items()}, "records": count}
    manifest_path(out).unlink(missing_ok=True)  # no manifest while the set is being swapped in
    for name, tmp in temps.items():
        os.replace(tmp, paths[name])
    os.replace(_write_temp(manifest_path(out), lambda fh: json.dump(manifest, fh, indent=2)), manifest_path(out))
    return paths


def _csv_table(fh: IO[str], columns: list[str]) -> csv.DictWriter:
    """A CSV writer of rows (dicts) with these columns, as pandas writes them: a missing value
    empty, other keys left out."""
    table = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    table.writeheader()
    return table


def results_complete(out: Path) -> bool:
    """Whether the results for `out` are one whole set, as its manifest says."""
    try:
        manifest = json.loads(manifest_path(out).read_text())
        return all(file_sha256(Path(out).with_name(name)) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# Spreadsheet (openpyxl)
# ---------------------------------------------------------------------------------------------

REVIEW_FILL = "FFD27F"  # the cells a person should check


def _plain(value: str) -> str:
    """A CSV cell as its text: the apostrophe `as_text` put before a formula-like value removed."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value


def as_number(text: str) -> tuple[float, str] | None:
    """A quantity as written ('1,234.56', '923.15', '12,5', '0042') as a number and the Excel
    number format that shows it with its decimals; None when it is not one. The last of '.'
    and ',' before one or two final digits is the decimal mark; others group thousands."""
    text = text.strip()
    found = re.fullmatch(r"(\d[\d.,]*?)(?:([.,])(\d{1,2}))?", text)
    if not text or not found:
        return None
    whole, _, decimals = found.groups()
    whole = whole.replace(",", "").replace(".", "")
    if not whole.isdigit():
        return None
    number = float(whole + ("." + decimals if decimals else ""))
    return number, "0." + "0" * len(decimals) if decimals else "0"


def write_xlsx(fields: pd.DataFrame, errors: pd.DataFrame, settings: dict, path: Path) -> None:
    """A workbook of a run's results: 'fields' (a row per page, a column per field, each value
    as written: a text cell so leading zeros stay or, for fields the template calls numeric
    and a person need not check, a number cell showing its decimals; cells needing review filled,
    their reasons as a comment; a batch of several forms: a sheet so for each, named after it),
    'errors' and 'settings'. No cell is a formula, whatever it holds. Written atomically."""
    import pandas as pd
    from openpyxl import Workbook
    from openpyxl.comments import Comment
    from openpyxl.styles import Font, PatternFill

    def put(sheet, row: int, column: int, value):
        cell = sheet.cell(row=row, column=column, value=_plain(value) if isinstance(value, str) else value)
        if isinstance(cell.value, str):
            cell.data_type = "s"  # text, never a formula
        return cell

    numeric = set(str(settings.get("numeric_fields", "")).split())
    fill = PatternFill("solid", start_color=REVIEW_FILL, end_color=REVIEW_FILL)
    book = Workbook()
    book.remove(book.active)
    forms = list(dict.fromkeys(fields["template"])) if "template" in fields and len(fields) else [""]
    for form in forms:  # a mixed batch: a sheet for each form, with its own columns
        part = fields[fields["template"] == form] if len(forms) > 1 else fields
        sheet = book.create_sheet(re.sub(r"[\\/*?:\[\]]", "_", form)[:31] if len(forms) > 1 else "fields")
        names = list(dict.fromkeys(part["field"])) if len(part) else []
        for column, title in enumerate(["file", "page", *names], start=1):
            put(sheet, 1, column, title).font = Font(bold=True)
        for row, ((file, page), group) in enumerate(part.groupby(["file", "page"], sort=False), start=2):
            put(sheet, row, 1, file)
            put(sheet, row, 2, int(page))
            for _, f in group.iterrows():
                text = _plain(final_value(f))
                number = as_number(text) if f["field"] in numeric and f["status"] not in ("review", "unreadable") else None
                cell = put(sheet, row, 3 + names.index(f["field"]), number[0] if number else text)
                if number:
                    cell.number_format = number[1]
                if f["status"] in ("review", "unreadable"):
                    cell.fill = fill
                    unreadable = f["status"] == "unreadable"
                    why = f"unreadable, said {_plain(str(f.get('reviewed_by', '')))}" if unreadable else _plain(str(f["reasons"]))
                    cell.comment = Comment(f"{why} (confidence {float(f['confidence']):.2f})", "formreader")
        sheet.freeze_panes = "C2"
        for column in sheet.columns:  # wide enough for what each holds: no value shown cut short
            longest = max(len(str(c.value)) for c in column if c.value is not None)
            sheet.column_dimensions[column[0].column_letter].width = min(60, longest + 2)
        # Printed, a page's row fits across the paper.
        sheet.page_setup.orientation = "landscape"
        sheet.sheet_properties.pageSetUpPr.fitToPage = True
        sheet.page_setup.fitToWidth, sheet.page_setup.fitToHeight = 1, 0
    for name, frame in (
        ("errors", errors),
        ("settings", pd.DataFrame({"setting": list(settings), "value": list(settings.values())})),
    ):
        ws = book.create_sheet(name)
        for column, title in enumerate(frame.columns, start=1):
            put(ws, 1, column, str(title)).font = Font(bold=True)
        for row, values in enumerate(frame.itertuples(index=False), start=2):
            for column, value in enumerate(values, start=1):
                put(ws, row, column, value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value))
    data = io.BytesIO()
    book.save(data)
    write_atomically(Path(path), data.getvalue())


def workbook_path_for(out: Path) -> Path:
    """Where the README's workflow keeps the workbook: results.csv -> results.xlsx."""
    return _beside(out, ".xlsx")


class NotResultsError(ValueError):
    """A file that is not the results of `formreader process`."""


def write_workbook(results: Path, xlsx: Path) -> int:
    """Write the workbook of the results of `process --out results` (its CSVs, and the run's
    settings from its journal) to `xlsx`; returns the number of pages. Raises NotResultsError."""
    import pandas as pd

    paths = output_paths(results)
    try:
        fields = pd.read_csv(paths["fields"], dtype=str, keep_default_na=False)
        errors = pd.read_csv(paths["errors"], dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise NotResultsError(f"{results}: not the results of formreader process: {e}") from e
    missing = {"file", "page", "field", "value", "status", "reasons", "confidence"} - set(fields.columns)
    if missing:
        raise NotResultsError(f"{results}: not the results of formreader process (no column {', '.join(sorted(missing))})")
    journal = journal_path_for(results)
    settings = journal_settings(journal) if journal.exists() else {}
    write_xlsx(fields, errors, {"results": str(results), **settings}, xlsx)
    return fields[["file", "page"]].drop_duplicates().shape[0]


def rewrite_results(out: Path, records: Iterable[dict]) -> None:
    """Write the results again (a person's decisions in them): the CSVs and manifest, then the
    workbook beside them if the user made one."""
    write_results(records, out)
    if workbook_path_for(out).exists():
        write_workbook(out, workbook_path_for(out))
