"""Templates: the YAML schema, clear errors, and proposing a template from a blank form."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import replace

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from formreader.reading.template import TemplateError, group_fields, load_template, propose_template
from formreader.training.synth import blank_form

from .conftest import ROOT, TEMPLATE


def test_demo_template_loads(template):
    assert [f.name for f in template.fields] == ["customer_no", "date", "quantity", "postal_code", "amount", "phone"]
    assert [len(f.cells) for f in template.fields] == [8, 8, 4, 5, 7, 10]
    assert template.reference.shape == (874, 1240) and template.dpi == 150
    quantity = template.fields[2]
    assert quantity.optional and quantity.length is None
    date = template.fields[1].pattern  # a day and a month that exist
    assert re.fullmatch(date, "31122019") and not any(re.fullmatch(date, d) for d in ("76051999", "01132019", "00102019"))


@pytest.fixture()
def template_copy(tmp_path):
    shutil.copy(ROOT / "templates" / "demo_form.png", tmp_path / "demo_form.png")
    doc = yaml.safe_load(TEMPLATE.read_text())
    return tmp_path, doc


def write(tmp_path, doc):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["fields"][1]["cells"].__setitem__(2, [1230, 10, 36, 36]),
            "field 'date': cells[2] [1230, 10, 36, 36] lies outside the reference image",
        ),
        (lambda d: d["fields"][0].__setitem__("length", 9), "field 'customer_no': 'length' must be an integer from 1 to 8"),
        (lambda d: d["fields"][2].__setitem__("name", "customer_no"), "field 'customer_no': name used more than once"),
        (lambda d: d["fields"][3].__setitem__("lenght", 5), "field 'postal_code': unknown key(s) lenght"),
        (lambda d: d["fields"][4]["cells"].__setitem__(0, [1, 2, 3]), "field 'amount': cells[0] must be four integers"),
        (lambda d: d["fields"][5].__setitem__("name", "phone number"), "'name' must be an identifier"),
        (lambda d: d.__setitem__("reference", "missing.png"), "reference image"),
        (lambda d: d.pop("fields"), "missing 'fields'"),
        (lambda d: d.__setitem__("dpi", "high"), "'dpi' must be a number"),
        (lambda d: d["fields"][1].__setitem__("pattern", "(0[1-9]"), "field 'date': 'pattern' is not a regular expression"),
        (lambda d: d["fields"][0].__setitem__("check", "crc"), "field 'customer_no': 'check' must be 'luhn'"),
        (lambda d: d.__setitem__("review_risk", 0.9), "'review_risk': input should be less than or equal to 0.5, not 0.9"),
        (lambda d: d.__setitem__("document", "cheque"), "'document': input should be 'form' or 'check', not 'cheque'"),
        (
            lambda d: d["fields"][1].__setitem__("pattern", r"\d\d/\d\d/\d{4}"),
            "field 'date': 'pattern' is matched against the digits read, without the marks printed between the boxes",
        ),
    ],
)
def test_bad_template_errors_name_file_field_and_problem(template_copy, change, message):
    tmp_path, doc = template_copy
    change(doc)
    path = write(tmp_path, doc)
    with pytest.raises(TemplateError) as err:
        load_template(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_template_not_yaml(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("fields: [unclosed\n")
    with pytest.raises(TemplateError, match="not valid YAML"):
        load_template(path)


def test_propose_template_finds_every_box_exactly():
    blank, fields = blank_form()
    proposed, candidates = propose_template(blank, 150)
    assert [f.name for f in proposed] == [f"field_{i}" for i in range(1, 7)]
    assert [f.kind for f in candidates] == ["free", "free"]  # the signature line and the office-use rule, to decide
    # The printed separators between groups of boxes become the fields' formats.
    assert [f.format for f in proposed] == [f.format for f in fields] == ["", "##/##/####", "", "", "#####.##", "###-###-####"]
    # The date's boxes get a date's pattern, day and month in either order; no other field a pattern.
    date = proposed[1].pattern
    assert [bool(f.pattern) for f in proposed] == [False, True, False, False, False, False]
    assert all(re.fullmatch(date, d) for d in ("01102019", "31122019", "12312019", "29021996"))
    assert not any(re.fullmatch(date, d) for d in ("76051999", "13131999", "00102019", "01011899", "0110201"))
    # Separate squares, combs split by / . - separators, and two fields far apart on one line.
    assert [f.cells for f in proposed] == [f.cells for f in fields]


def test_propose_template_on_a_scanned_rotated_blank():
    blank, fields = blank_form()
    m = cv2.getRotationMatrix2D((620, 437), 1.5, 1.0)
    tilted = cv2.warpAffine(blank, m, (1240, 874), borderValue=255)
    proposed, _ = propose_template(tilted, 150)
    assert [len(f.cells) for f in proposed] == [len(f.cells) for f in fields]


def test_group_fields_rules():
    box = lambda x, y=100: (x, y, 30, 30)  # noqa: E731
    # Touching boxes, a separator gap of one box, a far run, and a new line.
    boxes = [box(0), box(32), box(64), box(126), box(158), box(400), box(432), box(0, 200)]
    groups = group_fields(boxes)
    assert [len(g) for g in groups] == [5, 2, 1]


def test_cli_template_detect(tmp_path):
    blank, _ = blank_form()
    cv2.imwrite(str(tmp_path / "blank.png"), blank)
    out = tmp_path / "t.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "formreader.cli", "template", "detect", str(tmp_path / "blank.png"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "6 fields, 42 boxes" in run.stdout and "Named after their printed labels" in run.stdout
    tpl = load_template(out)
    assert len(tpl.cells) == 42 and np.array_equal(tpl.reference, blank)
    # Named after the labels printed beside them (Tesseract): "Customer no." -> customer_no.
    assert [f.name for f in tpl.fields] == ["customer_no", "date", "quantity", "postal_code", "amount", "phone"]


def test_fields_are_named_after_their_labels_left_or_above():
    from formreader.reading.labels import identifier, name_fields
    from formreader.training.synth import blank_check, free_form

    assert identifier("Date (DD/MM/YYYY)") == "date" and identifier("Customer no.") == "customer_no"
    # Labels above the boxes; a check's "DATE" on the left of its line, and only a "$" beside its
    # amount box, which so keeps its proposed name.
    for (blank, _), expected in ((free_form(), ["amount", "quantity", "account", "date", "reference", "total"]),
                                 (blank_check(), ["date", "field_2"])):
        proposed, _ = propose_template(blank, 150)
        assert [f.name for f in name_fields(blank, proposed, 150)] == expected


def test_cli_template_detect_on_a_page_without_boxes(tmp_path):
    cv2.imwrite(str(tmp_path / "plain.png"), np.full((500, 700), 255, np.uint8))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "formreader.cli",
            "template",
            "detect",
            str(tmp_path / "plain.png"),
            "--out",
            str(tmp_path / "t.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "no digit boxes or free fields found" in run.stderr


def test_check_template_patterns_load_and_round_trip(tmp_path):
    from formreader.reading.template import template_yaml
    from formreader.training.synth import blank_check

    shutil.copy(ROOT / "templates" / "bank_check.png", tmp_path / "bank_check.png")
    _, fields = blank_check()
    (tmp_path / "t.yaml").write_text(template_yaml(fields, "bank_check.png", 150, "check"))
    date, amount = load_template(tmp_path / "t.yaml").fields
    assert (date.pattern, amount.pattern) == (fields[0].pattern, fields[1].pattern)
    assert re.fullmatch(date.pattern, "05/12/2021") and not re.fullmatch(date.pattern, "05/12-2021")
    assert re.fullmatch(amount.pattern, "1,234.56") and not re.fullmatch(amount.pattern, "974.0.")


def test_bad_pattern_is_refused_with_the_field_named(tmp_path):
    shutil.copy(ROOT / "templates" / "bank_check.png", tmp_path / "bank_check.png")
    doc = yaml.safe_load((ROOT / "templates" / "bank_check.yaml").read_text())
    doc["fields"][1]["pattern"] = r"(\d+\.\d{2}"
    with pytest.raises(TemplateError, match="field 'amount': 'pattern' is not a regular expression"):
        load_template(write(tmp_path, doc))


def test_cli_template_check_lists_free_fields_with_their_rules():
    from click.testing import CliRunner

    from formreader.cli import main

    result = CliRunner().invoke(main, ["template", "check", str(ROOT / "templates" / "bank_check.yaml")])
    assert result.exit_code == 0, result.output
    date, amount, risk = result.output.splitlines()
    assert date.startswith("date: written freely in box [742, 40, 268, 58]") and 'separators "/.-"' in date
    assert "min length 3" in amount and "pattern '(" in amount
    assert risk.startswith("review_risk 0.01 on a check: fields less sure than ")  # the thresholds: test_string_model.py


def test_detect_writes_yaml_by_the_library_and_never_overwrites(tmp_path):
    """A name with ': ' and '#' round-trips; a dpi of 150.012 is written 150; an existing file
    is kept unless --force."""
    from formreader.reading.template import Field, template_yaml

    blank, _ = blank_form()
    cv2.imwrite(str(tmp_path / "blank.png"), blank)
    fields = [Field("total", kind="free", box=(10, 10, 200, 60), separators=".,", pattern=r"\d+\.\d{2}  # cents")]
    text = template_yaml(fields, "blank.png", 150.012, "Form: A #2")
    (tmp_path / "t.yaml").write_text(text)
    tpl = load_template(tmp_path / "t.yaml")
    assert tpl.name == "Form: A #2" and tpl.dpi == 150 and "dpi: 150\n" in text
    assert tpl.fields[0].pattern == r"\d+\.\d{2}  # cents"
    out = tmp_path / "t.yaml"
    before = out.read_text()
    run = subprocess.run(
        [sys.executable, "-m", "formreader.cli", "template", "detect", str(tmp_path / "blank.png"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "--force" in run.stderr and out.read_text() == before
    run = subprocess.run(
        [sys.executable, "-m", "formreader.cli", "template", "detect", str(tmp_path / "blank.png"), "--out", str(out), "--force"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and len(load_template(out).cells) == 42


@pytest.mark.parametrize(
    "form, message",
    [("'###'", r"one # per cell \(8\)"), ("'####x####'", "one # per cell"), ("7", "one # per cell")],
)
def test_a_format_must_fit_the_cells(tmp_path, form, message):
    text = TEMPLATE.read_text().replace("reference: demo_form.png", f"reference: {TEMPLATE.with_suffix('.png')}")
    text = text.replace("- name: customer_no\n", f"- name: customer_no\n  format: {form}\n")
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TemplateError, match=message):
        load_template(tmp_path / "t.yaml")


def test_a_reading_is_written_in_its_field_format():
    from formreader.reading.fields import written
    from formreader.reading.template import Field

    amount = Field("amount", ((0, 0, 9, 9),) * 7, format="#####.##")
    assert written(amount, "  92315") == "923.15"
    assert written(amount, "1234567") == "12345.67"
    assert written(amount, "       ") == ""
    assert written(Field("d", ((0, 0, 9, 9),) * 8, format="##/##/####"), "0110201 ") == "01/10/201"
    assert written(Field("n", ((0, 0, 9, 9),) * 3), " 4?") == "4?"


def _near(a, b, px: int = 3) -> bool:
    return all(abs(u - v) <= px for u, v in zip(a, b))


def test_free_fields_are_proposed_on_a_blank_check_and_a_census_form():
    from formreader.training.synth import blank_check, free_form

    blank, truth = blank_check()  # the date written on a guide line, the amount in a box
    proposed, candidates = propose_template(blank, 150)
    assert [f.kind for f in proposed] == ["free", "free"]
    assert all(_near(p.box, t.box) for p, t in zip(proposed, truth))
    assert len(candidates) == 3 and all(c.box[2] > 2 * 150 for c in candidates)  # the long lines: payee, memo
    blank, truth = free_form()
    proposed, candidates = propose_template(blank, 150)
    assert len(proposed) == 6 and not candidates and all(_near(p.box, t.box) for p, t in zip(proposed, truth))


def test_cli_template_detect_on_the_blank_check_with_a_preview(tmp_path):
    shutil.copy(ROOT / "templates" / "bank_check.png", tmp_path / "check.png")
    out, preview = tmp_path / "t.yaml", tmp_path / "preview.png"
    run = subprocess.run(
        [sys.executable, "-m", "formreader.cli", "template", "detect", str(tmp_path / "check.png"), "-o", str(out),
         "--preview", str(preview)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "2 fields, 0 boxes, 2 free fields (3 more lines commented out)" in run.stdout
    assert [f.kind for f in load_template(out).fields] == ["free", "free"]
    picture = cv2.imread(str(preview))
    assert picture.shape[:2] == cv2.imread(str(tmp_path / "check.png")).shape[:2]
    assert (np.abs(picture[..., 0].astype(int) - picture[..., 2].astype(int)) > 100).mean() > 0.001  # blue outlines
    # The commented-out lines become fields once uncommented.
    text = re.sub(r"^# (?=[- ])", "", out.read_text(), flags=re.M)
    (tmp_path / "all.yaml").write_text(text)
    assert len(load_template(tmp_path / "all.yaml").fields) == 5


def test_every_problem_at_once_with_its_line(template_copy):
    tmp_path, doc = template_copy
    doc["fields"][0]["lenght"] = 8  # unknown key
    doc["fields"][1]["cells"][1] = list(doc["fields"][1]["cells"][0])  # the same box twice
    x, y, w, h = doc["fields"][2]["cells"][0]
    doc["fields"][2]["cells"][0] = [x + 20, y, w, h]  # overlaps its neighbour
    doc["fields"][3]["cells"][4] = [1230, 10, 36, 36]  # outside the image
    doc["fields"][4]["name"] = "amount total"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(TemplateError) as err:
        load_template(path)
    message = str(err.value)
    assert re.search(r"line \d+: field 'customer_no': unknown key\(s\) lenght", message)
    assert message.startswith(f"{path}: 2 problems:") and "'name' must be an identifier" in message
    # Structure first: the layout is checked once the file has the form a template has.
    doc["fields"][0].pop("lenght")
    doc["fields"][4]["name"] = "amount"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(TemplateError) as err:
        load_template(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 3 problems:")
    same = r"line \d+: field 'date': cells\[1\] \[\d+, \d+, 36, 36\] is the same box as cells\[0\] of field 'date'"
    assert re.search(same, message)
    assert re.search(r"line \d+: field 'quantity': cells\[1\] .* overlaps cells\[0\] of field 'quantity'", message)
    assert "field 'postal_code': cells[4] [1230, 10, 36, 36] lies outside the reference image" in message
    text = path.read_text().splitlines()
    for line, x in re.findall(r"line (\d+): .*? \[(\d+), ", message):
        assert x in text[int(line) - 1]  # each line number points at the offending box


def test_a_dpi_the_reference_contradicts_is_refused(template_copy):
    tmp_path, doc = template_copy
    Image.open(tmp_path / "demo_form.png").save(tmp_path / "demo_form.png", dpi=(300, 300))
    with pytest.raises(TemplateError, match=r"'dpi' is 150 but the reference image says 300 DPI"):
        load_template(write(tmp_path, doc))


def test_the_published_schema_is_the_one_checked():
    from formreader.reading.schema import TemplateFile, schema_json

    assert (ROOT / "templates" / "template.schema.json").read_text() == schema_json()
    for name in ("demo_form.yaml", "bank_check.yaml"):
        TemplateFile.model_validate(yaml.safe_load((ROOT / "templates" / name).read_text()))


@pytest.mark.parametrize("line", [2, 4])
def test_combs_of_short_ticks_are_found_and_grouped(line):
    """Boxes printed as ticks on a base line enclose no hole; they are found all the same,
    exactly on an upright blank and grouped into the same fields on one scanned a little askew."""
    from formreader.training.synth import ticked

    blank, fields = blank_form(line)
    blank = ticked(blank, fields, line)
    proposed, _ = propose_template(blank, 150)
    assert [f.cells for f in proposed] == [f.cells for f in fields]
    assert [f.format for f in proposed] == [f.format for f in fields]
    for angle in (1.5, -2.0):
        tilted = cv2.warpAffine(blank, cv2.getRotationMatrix2D((620, 437), angle, 1.0), (1240, 874), borderValue=255)
        noisy = np.clip(tilted * 0.93 + np.random.default_rng(1).normal(0, 4, tilted.shape), 0, 255).astype(np.uint8)
        proposed, _ = propose_template(noisy, 150)
        assert [len(f.cells) for f in proposed] == [len(f.cells) for f in fields]


@pytest.mark.parametrize("style", ["grey", "tinted", "dotted", "dropout", "hanging ticks", "dashed"])
def test_boxes_printed_in_other_styles_are_found_exactly(style):
    """Grey frames, frames on a tinted band, combs with dotted dividers, frames in a drop-out
    colour, ticks hanging from a top line, frames drawn with dashes: every box found where it
    is, grouped as printed."""
    from formreader.training.synth import printed_as

    blank, fields = blank_form()
    proposed, _ = propose_template(printed_as(blank, fields, style), 150)
    assert [f.cells for f in proposed] == [f.cells for f in fields]


def test_hostile_names_and_patterns_survive_a_yaml_round_trip(tmp_path):
    """template_yaml writes through the YAML library: a form name or a pattern with ': ', '#',
    quotes or non-ASCII text comes back exactly as it went in."""
    from formreader.reading.template import Field, template_yaml
    from formreader.training.synth import blank_check

    shutil.copy(ROOT / "templates" / "bank_check.png", tmp_path / "bank_check.png")
    _, fields = blank_check()
    name = 'Form #3: \'pay\' "order" — été: [x] {y} & *z'
    hostile = [replace(fields[0], pattern=r"\d{1,2}/\d{1,2}/\d{4}( #\d+)?"), replace(fields[1], pattern=r"(\d+): ?\d{2}")]
    (tmp_path / "t.yaml").write_text(template_yaml(hostile, "bank_check.png", 150.0004, name), encoding="utf-8")
    loaded = load_template(tmp_path / "t.yaml")
    assert loaded.name == name and loaded.dpi == 150
    assert [f.pattern for f in loaded.fields] == [f.pattern for f in hostile]
    assert all(isinstance(f, Field) for f in loaded.fields)
