"""Export: page records -> pandas tables -> CSV files written atomically.

For `--out results.csv` four files are written side by side:
- results.csv         one row per field per page: file, page, field, value, confidence, status, reasons,
                      raw (free-written fields: the number with its separators, e.g. 1.234,56)
- results.digits.csv  one row per cell: the digit read and its confidence
- results.wide.csv    one row per page, a column per field (for spreadsheets)
- results.errors.csv  one row per file or page that could not be read, with the reason
Values are digit strings: leading zeros are kept (read them back with dtype=str).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

FIELD_COLUMNS = ["file", "page", "field", "value", "confidence", "status", "reasons", "raw", "registration_quality"]
DIGIT_COLUMNS = ["file", "page", "field", "cell", "digit", "confidence"]
ERROR_COLUMNS = ["file", "page", "error"]


def results_frames(records: list[dict]) -> dict[str, pd.DataFrame]:
    """Tables 'fields', 'digits', 'wide' and 'errors' from page records (pipeline.page_record)."""
    fields, digits, errors, wide = [], [], [], []
    for rec in records:
        if rec.get("error"):
            errors.append({"file": rec["source"], "page": rec["page"], "error": rec["error"]})
            continue
        row = {"file": rec["source"], "page": rec["page"]}
        flagged = []
        for f in rec["fields"]:
            fields.append(
                {
                    "file": rec["source"],
                    "page": rec["page"],
                    "field": f["field"],
                    "value": f["value"],
                    "confidence": round(f["confidence"], 4),
                    "status": f["status"],
                    "reasons": "; ".join(f["reasons"]),
                    "raw": f.get("raw", ""),
                    "registration_quality": rec.get("quality"),
                }
            )
            for i, (digit, conf) in enumerate(f["digits"], start=1):
                digits.append(
                    {
                        "file": rec["source"],
                        "page": rec["page"],
                        "field": f["field"],
                        "cell": i,
                        "digit": digit,
                        "confidence": round(conf, 4),
                    }
                )
            row[f["field"]] = f["value"]
            if f["status"] != "ok":
                flagged.append(f["field"])
        row["review"] = " ".join(flagged)
        wide.append(row)
    return {
        "fields": pd.DataFrame(fields, columns=FIELD_COLUMNS).astype({"value": str, "reasons": str, "raw": str}),
        "digits": pd.DataFrame(digits, columns=DIGIT_COLUMNS).astype({"digit": str}),
        "wide": pd.DataFrame(wide),
        "errors": pd.DataFrame(errors, columns=ERROR_COLUMNS),
    }


def output_paths(out: Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "fields": out,
        "digits": out.with_name(stem + ".digits.csv"),
        "wide": out.with_name(stem + ".wide.csv"),
        "errors": out.with_name(stem + ".errors.csv"),
    }


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV so that the file is either the old one or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            frame.to_csv(fh, index=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(records: list[dict], out: Path) -> dict[str, Path]:
    """Write the four CSVs for `out`; returns their paths by table name."""
    frames = results_frames(records)
    paths = output_paths(out)
    for name, frame in frames.items():
        write_csv_atomic(frame, paths[name])
    return paths
