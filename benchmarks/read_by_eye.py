"""What a person reads on the benchmarks' hardest pages: the fields as a clerk sees them, read by
eye without the truth, against the truth and against formreader.

    python benchmarks/read_by_eye.py sheets OUT [--fields 40] [--seed 64]
    python benchmarks/read_by_eye.py score [benchmarks/by_eye/readings.csv] [--fields 40] [--seed 64]

`sheets` writes OUT/sheet_NN.png: a seeded sample of fields from the rows below, each field cut
from its registered page (the frame the review station shows) with an id and nothing else; read
them and write `id,reading` lines, the digits as read, ending in `?` where you would not sign the
reading off (a clerk's "ask"), empty where nothing can be read. `score` makes the same fields
again (the truth is never written to disk) and prints, per row, how many the reader read right,
how many they would have asked about and how many they read wrong without asking, beside what
formreader does with the very same fields: right, flagged, wrong but `ok`. The pages are drawn
with seeds the benchmarks do not use, so a reader who has seen the benchmarks' errors has not
seen these.

Rows: the two populations of writers the aims fall furthest short on (CVL's validation writers,
NSYSU's exam boxes) on the thick worn bitonal form and in free fields on forms (bitonal too), NSYSU
on the samples' grey form, and MNIST's test digits on the bitonal form as a control of the reader.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from formreader.pipeline import free_field_crop, free_field_window, read_segmented, segment_page  # noqa: E402
from formreader.reading.classify import DigitClassifier  # noqa: E402
from formreader.reading.locate import bounding_box  # noqa: E402
from formreader.reading.register import RegistrationError, prepare_reference  # noqa: E402
from formreader.reading.string_model import digits_of  # noqa: E402
from formreader.training.evaluate import held_out_writers  # noqa: E402
from formreader.training.synth import scanned_forms, scanned_free_forms  # noqa: E402

BITONAL = "thick worn borders, bitonal 300 dpi"
# (row id, source of writers, form: a FORM_STYLES name or "free"); pages are drawn per row.
ROWS = [
    ("M-bitonal", "MNIST test", BITONAL),
    ("N-grey", "NSYSU exam boxes", "samples' form"),
    ("N-bitonal", "NSYSU exam boxes", BITONAL),
    ("C-bitonal", "CVL validation writers", BITONAL),
    ("N-free", "NSYSU exam boxes", "free"),
    ("C-free", "CVL validation writers", "free"),
]
FIELDS_A_SHEET = 10
SHEET_WIDTH = 900


def field_crop(aligned: np.ndarray, boxes: list) -> np.ndarray:
    """The part of a registered page (H, W) that holds a field's boxes, with a third of a box's
    height of page around them, as a reviewer sees it."""
    return free_field_crop(aligned, bounding_box(boxes), margin=max(b[3] for b in boxes) // 3)[0]


def sampled_fields(n: int, seed: int) -> list[dict]:
    """For each row, `n` fields drawn at random from its pages: id, row, crop, truth and
    formreader's reading (value, status)."""
    classifier = DigitClassifier.load(None)
    sources = held_out_writers()
    rng = np.random.default_rng(seed)
    out = []
    for r, (row, source, form) in enumerate(ROWS):
        images, labels = sources[source]
        pages = 3 + n // 6  # a page holds six fields
        if form == "free":
            template, items = scanned_free_forms(images, labels, pages, seed * 100 + r)
        else:
            template, items = scanned_forms(form, images, labels, pages, seed * 100 + r)
        features = prepare_reference(template.reference)
        fields = []
        for page, truth in items:
            try:
                seg = segment_page(page, template, features)
            except RegistrationError:
                continue
            aligned = seg.registration.aligned
            read = read_segmented(seg, template, classifier)
            for spec, f in zip(template.fields, read.fields):
                written = digits_of(truth[f.name] or "")
                if not written:  # a field left empty: nothing to read
                    continue
                crop = free_field_window(aligned, spec.box)[0] if spec.kind == "free" else field_crop(aligned, spec.cells)
                fields.append({"row": row, "crop": crop, "truth": written, "value": digits_of(f.value), "status": f.status})
        out += [fields[i] for i in sorted(rng.choice(len(fields), size=min(n, len(fields)), replace=False))]
    # The sheets mix the rows and number the fields in that order, so that a reader does not know
    # whose writing a field is.
    return [{**out[i], "id": f"{k + 1:03d}"} for k, i in enumerate(rng.permutation(len(out)))]


def tile(field: dict) -> np.ndarray:
    """A field's crop enlarged for the eye (at most 4x, to the sheet's width or 140 px high), under its id."""
    crop = field["crop"]
    scale = min(4.0, SHEET_WIDTH / crop.shape[1], 140 / crop.shape[0])
    crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)[:, :SHEET_WIDTH]
    out = np.full((crop.shape[0] + 28, SHEET_WIDTH), 255, np.uint8)
    out[28:, : crop.shape[1]] = crop
    cv2.putText(out, field["id"], (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0, 1, cv2.LINE_AA)
    cv2.line(out, (0, 0), (SHEET_WIDTH - 1, 0), 0, 1)
    return out


def write_sheets(fields: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(fields), FIELDS_A_SHEET):
        cv2.imwrite(str(folder / f"sheet_{s // FIELDS_A_SHEET + 1:02d}.png"),
                    np.vstack([tile(f) for f in fields[s : s + FIELDS_A_SHEET]]))
    print(f"{len(fields)} fields on {-(-len(fields) // FIELDS_A_SHEET)} sheets in {folder}")


def score(fields: list[dict], readings: dict[str, str], details: bool = False) -> None:
    print("row          fields | by eye: right  asked  wrong, not asked | formreader: right  flagged  wrong but ok"
          " | formreader wrong where the eye was right")
    for row, source, form in ROWS:
        mine = [f for f in fields if f["row"] == row and f["id"] in readings]
        if not mine:
            continue
        n = len(mine)
        said = [readings[f["id"]] for f in mine]
        eye = [(digits_of(r) == f["truth"], r.endswith("?") or not r) for r, f in zip(said, mine)]
        model = [(f["value"] == f["truth"], f["status"] != "ok") for f in mine]
        eye_right = sum(r for r, _ in eye)
        print(
            f"{row:12s} {n:6d} | {eye_right / n:13.1%} {sum(a for _, a in eye) / n:6.1%} "
            f"{sum(not r and not a for r, a in eye):6d} {'':11s}| {sum(r for r, _ in model) / n:17.1%} "
            f"{sum(fl for _, fl in model) / n:8.1%} {sum(not r and not fl for r, fl in model):13d} | "
            f"{sum(e[0] and not m[0] for e, m in zip(eye, model))} (and the eye wrong where formreader was right: "
            f"{sum(m[0] and not e[0] for e, m in zip(eye, model))})  [{source}, {form}]"
        )
        for f, e, m in zip(mine, eye, model):
            if details and e[0] != m[0]:
                print(f"    {f['id']}: written {f['truth']}, by eye {readings[f['id']]}, formreader {f['value']} ({f['status']})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["sheets", "score"])
    parser.add_argument("path", type=Path, nargs="?", default=ROOT / "benchmarks" / "by_eye" / "readings.csv",
                        help="sheets: the folder to write them to; score: the readings (id,reading)")
    parser.add_argument("--fields", type=int, default=40, help="fields a row")
    parser.add_argument("--seed", type=int, default=64)
    parser.add_argument("--details", action="store_true", help="score: list the fields the eye and formreader read differently")
    args = parser.parse_args()
    fields = sampled_fields(args.fields, args.seed)
    if args.command == "sheets":
        write_sheets(fields, args.path)
        return
    with open(args.path, newline="") as f:
        readings = {r["id"]: r["reading"].strip() for r in csv.DictReader(line for line in f if not line.startswith("#"))}
    score(fields, readings, args.details)


if __name__ == "__main__":
    main()
