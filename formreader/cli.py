"""The `formreader` command line: a thin layer over the pipeline (click for parsing and help)."""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import closing, nullcontext
from pathlib import Path

import click

from formreader.reading.classify import CALIBRATION_FREE_FORMS, CALIBRATION_PAGES, REVIEW_RISK

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter is not for users


def _fail(message: str, code: int = 2):
    click.echo(f"formreader: error: {message}", err=True)
    sys.exit(code)


def _need(module: str, extra: str) -> None:
    """Stop with a clear message when an optional part is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        _fail(f"this command needs {module}, which reading does not: pip install 'formreader[{extra}]'")


def _load_templates(paths: tuple[Path, ...]) -> list:
    """Every template named (a folder: its .yaml files), each once; two of one name are refused,
    since the name tells their pages apart in the results."""
    files: list[Path] = []
    for p in paths:
        found = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p]
        if not found:
            _fail(f"--template {p}: a folder with no template (.yaml) in it")
        files += [f for f in found if f.resolve() not in {g.resolve() for g in files}]
    forms = [_load_template(f) for f in files]
    names = [t.name for t in forms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        both = ", ".join(str(f) for f, t in zip(files, forms) if t.name == twice[0])
        _fail(f"two templates are named '{twice[0]}' ({both}): rename one (its 'name:'), since the name tells their pages apart")
    return forms


def _load_template(path: Path):
    from formreader.reading.template import TemplateError, load_template

    try:
        return load_template(path)
    except TemplateError as e:
        _fail(str(e))


REVIEW_RISK_OPTION = click.option(
    "--review-risk",
    type=click.FloatRange(0, 0.5, min_open=True),
    help="The share of fields that may be let out wrong but ok, for every template (instead of its review_risk); "
    "the models' thresholds for it decide.",
)


def _at_risk(forms: list, risk: float | None, threshold: float | None) -> list:
    """The templates with `risk` as their review_risk (--review-risk); a threshold given too is
    refused, as it would decide instead."""
    from formreader.pipeline import at_review_risk, refuse_threshold_with_risk

    try:
        refuse_threshold_with_risk(threshold, risk)
    except ValueError:
        _fail("give --review-threshold or --review-risk, not both (the threshold would decide)")
    return [at_review_risk(t, risk) for t in forms]


def _review_thresholds(clf, threshold: float | None, forms: list) -> list[tuple[float, float]]:
    """Each template's review thresholds (pipeline.review_thresholds, for its review_risk); a model
    calibrated for no such risk ends the command (exit status 2) before anything is read."""
    from formreader.pipeline import review_thresholds
    from formreader.reading.classify import ModelError

    try:
        return [review_thresholds(clf, threshold, t.review_risk, t.document) for t in forms]
    except ModelError as e:
        _fail(f"{e} (asked by a template's review_risk or --review-risk)")


def _load_classifier(model: Path | None, calibrating: bool = False):
    from formreader.reading.classify import DigitClassifier, ModelError

    try:
        return DigitClassifier.load(model, calibrating=calibrating)
    except ModelError as e:
        _fail(str(e))


class _CtrlCHeld:
    """Ctrl-C noted, not raised, from now until `release`, which raises it (KeyboardInterrupt) if
    it was pressed. While a run starts it would be raised inside a library's import: there it
    broke an extension's initialisation (pydantic-core panicked), or left the interpreter marking
    it unhandled, so that the run ended killed by the signal (status -2) after saying it was
    interrupted. Held, it is raised at one known line, a second at most later. A run that started
    with Ctrl-C ignored (a background job of a shell, nohup) goes on ignoring it, as Unix wants."""

    def __init__(self):
        self.pressed = False
        self._previous = signal.getsignal(signal.SIGINT)
        # (None: a handler not set from Python, left as it is.)
        self._held = self._previous not in (signal.SIG_IGN, None)
        if self._held:
            signal.signal(signal.SIGINT, self._note)

    def _note(self, *_) -> None:
        self.pressed = True

    def release(self) -> None:
        if self._held:
            signal.signal(signal.SIGINT, self._previous)
        if self.pressed:
            raise KeyboardInterrupt


PAGES_PER_WORKER = 12  # the default --workers starts no more workers than one per this many pages
DATA_OPTION = click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder holding mnist/, cvl_digits/ and orand_car_a/; default $FORMREADER_DATA, else ../shared/data.",
)
FORCE_OPTION = click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
TIME_LIMIT_OPTION = click.option(
    "--time-limit",
    type=click.FloatRange(0, min_open=True),
    help="Seconds: stop after the last epoch that fits in them (the best weights kept), as on a lent accelerator's call.",
)


def _prepared_splits(prepared: Path | None, config, data: Path | None):
    """The digit model's training splits: read from `prepared` if it exists, else built (and
    written there when given)."""
    from formreader.training.train import TrainingData, build_training_data

    if prepared and prepared.exists():
        return TrainingData.load(prepared)
    splits = build_training_data(config, data)
    if prepared:
        splits.save(prepared)
    return splits


@click.group()
@click.version_option(package_name="formreader")
def main() -> None:
    """Read handwritten digits off scanned forms into CSV, flagging what a person should check."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--template",
    "-t",
    "templates",
    required=True,
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Template YAML, or a folder of them; repeat for a batch of several forms (each page is read as the one it matches).",
)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Results CSV (long form).")
@click.option(
    "--review-threshold",
    type=click.FloatRange(0, 1),
    help="Fields less sure than this go to review; default: the digit model's for boxed fields (chosen by `formreader "
    "calibrate`), the string model's for free ones (chosen by `formreader calibrate-strings`), each for the template's "
    "review_risk.",
)
@REVIEW_RISK_OPTION
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), help="Model file (.keras); default: the shipped one.")
@click.option(
    "--workers",
    "-j",
    default=0,
    type=click.IntRange(0, 64),
    help=f"Processes that read pages; default (0): one per core, at most one per {PAGES_PER_WORKER} pages.",
)
@click.option(
    "--scheduler",
    help="Read the pages on a Dask distributed cluster: its scheduler's address, tcp://HOST:PORT.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Keep the files an earlier run with the same --out finished (interrupted: the rest is read; finished: new files only).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def process(inputs, templates, out, review_threshold, review_risk, model, workers, scheduler, resume, quiet) -> None:
    """Read every page of INPUTS (files or folders) into OUT and its companion CSVs.

    Exit status: 0 when every file and page was read, 1 when some could not be (see the
    errors CSV), 2 for a bad template, model or option, 130 when interrupted (what was
    finished is kept: run again with --resume).
    """
    held = _CtrlCHeld()  # until the template and the models are loaded (_process)
    from formreader.export import manifest_path, output_paths
    from formreader.pipeline import start_reading_pool
    from formreader.reading.ingest import count_pages, scan_inputs

    files, skipped = scan_inputs(list(inputs))
    if not files:
        _fail("no PDF or image files found in " + ", ".join(map(str, inputs)) + _skipped_note(skipped))
    if out.suffix.lower() in (".xlsx", ".xls", ".ods"):
        _fail(
            f"--out {out}: the results are CSV files; write a workbook from them with "
            f"`formreader export {out.with_suffix('.csv')} --xlsx {out}`"
        )
    outputs = {os.path.realpath(p) for p in [*output_paths(out).values(), manifest_path(out)]}
    clash = [f for f in files if os.path.realpath(f) in outputs]
    if clash:
        _fail(f"--out {out} would overwrite the input {clash[0]}: choose another --out")
    # The bar counts pages (a 300-page PDF moves it 300 times), with pages/s and the time left.
    total = sum(count_pages(f) for f in files)
    # A worker costs a new interpreter and its imports (about 0.2 s) before its first page:
    # on the samples' form one process beat two up to about 20 pages (10 pages: 0.95-0.99 s
    # against 1.09-1.18) and two won from about 30 (40 pages: 2.0-2.2 s against 2.2-2.6).
    workers = workers or max(1, min(os.cpu_count() or 1, total // PAGES_PER_WORKER))
    # Started first, the workers start while the template and the models load here.
    try:
        with start_reading_pool(workers, scheduler) or nullcontext(workers) as pool:
            _process(
                files, skipped, templates, out, review_threshold, review_risk, model, pool, scheduler, resume, quiet, total, held
            )
    except KeyboardInterrupt:  # before any page was read (later ones are _process's to report)
        click.echo("\nformreader: interrupted before any page was read", err=True)
        sys.exit(130)


def _process(
    files, skipped, templates, out, review_threshold, review_risk, model, workers, scheduler, resume, quiet, total, held
):
    """`process`, its inputs listed and its workers started (`workers`: a ReadingPool, or how many),
    Ctrl-C `held` until the template and the models are loaded."""
    import hashlib

    from tqdm import tqdm

    from formreader.export import (
        OutputBusyError,
        OutputLock,
        journal_path_for,
        journal_records,
        output_paths,
        reviews_path_for,
        rewrite_results,
        views_path_for,
    )
    from formreader.pipeline import Journal, JournalError, process_paths
    from formreader.reading.string_model import VIEWS
    from formreader.review.decisions import apply_decisions, load_decisions

    forms = _at_risk(_load_templates(templates), review_risk, review_threshold)
    clf = _load_classifier(model)
    thresholds = _review_thresholds(clf, review_threshold, forms)
    held.release()  # a Ctrl-C pressed meanwhile is raised here: `process` reports it
    settings = {
        "template": hashlib.sha256(b"".join(Path(t.path).read_bytes() + t.reference.tobytes() for t in forms)).hexdigest()[:16],
        "model": clf.fingerprint,
        "string_model": clf.string_model.fingerprint if clf.string_model else "",
        "string_views": str(VIEWS) if clf.string_model else "",
        # The piece model reads free fields' pieces; the companion, boxed cells with the digit model.
        "piece_model": clf.strings.fingerprint if clf.strings else "",
        "companion_model": clf.companion.fingerprint if clf.companion else "",
        "struck_model": clf.struck.fingerprint if clf.struck else "",
        # The thresholds in force (each template's, for its review_risk): boxed fields', then free fields'.
        "review_threshold": " ".join(str(boxed) for boxed, _ in thresholds),
        "free_review_threshold": " ".join(str(free) for _, free in thresholds),
        # Which fields are quantities, for workbooks made from these results (number cells).
        "numeric_fields": " ".join(sorted({f.name for t in forms for f in t.fields if f.numeric})),
    }
    # SIGTERM (a scheduler's stop, `kill`) ends the run as Ctrl-C does: workers stopped, what is done kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    journal_path = journal_path_for(out)
    try:
        with OutputLock(out):
            journal = Journal(journal_path, resume=resume, settings=settings)
            bar = tqdm(total=total, unit="page", disable=quiet or None, file=sys.stderr)
            bar.update(sum(journal.done.get(str(f), 0) for f in files))  # pages an earlier run finished
            reading = process_paths(
                files, forms if len(forms) > 1 else forms[0], clf, review_threshold, workers, journal,
                scheduler=scheduler, views=views_path_for(out),
            )
            with closing(reading), bar:
                for rec in reading:  # recorded in the journal: the results are written from it
                    bar.update(1)
                    bar.set_postfix_str(Path(rec["source"]).name, refresh=False)
            # A person's decisions at the review station stay in the results of a later run.
            tally = _Tally()
            decisions = load_decisions(reviews_path_for(out))
            rewrite_results(out, apply_decisions(tally.count(journal_records(journal_path)), decisions))
            paths = output_paths(out)
            journal.close()
    except (OutputBusyError, JournalError, RuntimeError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write the results for --out {out}: {e.strerror or e} ({e.filename or out})")
    except KeyboardInterrupt:
        click.echo(
            f"\nformreader: interrupted; the pages finished are kept in {journal_path}: run the same "
            "command with --resume to go on",
            err=True,
        )
        sys.exit(130)
    errors = tally.errors
    if not quiet:
        click.echo(
            f"{tally.pages} pages read from {len(files)} files; {tally.fields} fields, "
            f"{tally.flagged} for review; {len(errors)} errors.\nResults: {paths['fields']}\n"
            f"Also: {paths['wide']}, {paths['digits']}, {paths['errors']}"
            + (f"\nCheck the flagged fields: formreader review {out}" if tally.flagged else "")
        )
        for e in errors:
            where = f"{e['source']}" + (f" page {e['page']}" if e["page"] else "")
            click.echo(f"  could not read {where}: {e['error']}", err=True)
        if skipped:
            click.echo(_skipped_note(skipped).strip(), err=True)
    # Everything is written and closed: the interpreter need not search what this process loaded
    # for cycles before it ends (its last collections took 0.1-0.15 s of every run; 0.03 now).
    gc.freeze()
    sys.exit(1 if errors else 0)


class _Tally:
    """What a run's records hold, counted as they stream past: pages read, fields, fields the
    machine flagged, and the records of what could not be read."""

    def __init__(self):
        self.pages = self.fields = self.flagged = 0
        self.errors: list[dict] = []

    def count(self, records: Iterable[dict]) -> Iterator[dict]:
        for rec in records:
            if rec.get("error"):
                self.errors.append(rec)
            else:
                self.pages += 1
                self.fields += len(rec["fields"])
                self.flagged += sum(f["status"] != "ok" for f in rec["fields"])
            yield rec


def _skipped_note(skipped: list[Path], named: int = 5) -> str:
    """Which files of the input folders were left unread for their type, for a message."""
    if not skipped:
        return ""
    names = ", ".join(str(f) for f in skipped[:named]) + (f" and {len(skipped) - named} more" if len(skipped) > named else "")
    files = "a file" if len(skipped) == 1 else f"{len(skipped)} files"
    return f"\nNot read: {files} in the folders of a type other than PDF or an image formreader reads: {names}"


@main.group()
def template() -> None:
    """Make and check form templates."""


@template.command("detect")
@click.argument("blank", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dpi", type=float, help="Resolution of BLANK; default: from the file, else 150.")
@click.option(
    "--preview", type=click.Path(dir_okay=False, path_type=Path), help="A PNG of the blank with each field outlined and numbered."
)
@FORCE_OPTION
def template_detect(blank, out, dpi, preview, force) -> None:
    """Propose a template from an image of the blank form: its boxes grouped into fields, empty
    boxes and short guide lines as free fields (longer lines commented out, for you to decide)."""
    import cv2

    from formreader.reading.ingest import PageError, read_pages
    from formreader.reading.labels import name_fields, ocr_available
    from formreader.reading.template import propose_template, template_yaml
    from formreader.review.overlay import draw_template

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to overwrite it, or choose another --out")
    first = next(iter(read_pages(blank)))
    if isinstance(first, PageError):
        _fail(f"{blank}: {first.reason}")
    dpi = dpi or first.dpi or 150.0
    fields, candidates = propose_template(first.image, dpi)
    named = ocr_available()
    if named:
        fields = name_fields(first.image, fields, dpi)
    if not fields:
        _fail(f"{blank}: no digit boxes or free fields found (boxes of {0.12 * dpi:.0f} to {dpi:.0f} px at {dpi:g} DPI)", 1)
    try:
        reference = os.path.relpath(blank.resolve(), out.resolve().parent)
    except ValueError:
        reference = str(blank.resolve())
    out.write_text(template_yaml(fields, reference, dpi, out.stem, candidates), encoding="utf-8")
    if preview and not cv2.imwrite(str(preview), draw_template(first.image, fields, candidates)):
        _fail(f"cannot write the preview {preview}")
    cells = sum(len(f.cells) for f in fields)
    free = sum(f.kind == "free" for f in fields)
    click.echo(
        f"{out}: {len(fields)} fields, {cells} boxes, {free} free fields"
        + (f" ({len(candidates)} more lines commented out)" if candidates else "")
        + (". Named after their printed labels where read; check" if named else
           ". Fields named field_N (pip install 'formreader[ocr]' and tesseract to name them after their labels); rename")
        + " them and add rules (length, optional)." + (f" Picture: {preview}" if preview else "")
    )


@template.command("schema")
def template_schema() -> None:
    """Print the JSON Schema of a template file (as published in templates/template.schema.json)."""
    from formreader.reading.schema import schema_json

    click.echo(schema_json(), nl=False)


@template.command("check")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def template_check(path) -> None:
    """Check a template file and list its fields."""
    tpl = _load_template(path)
    for f in tpl.fields:
        rules = [f"length {f.length}"] if f.length else []
        rules += [f"{k.replace('_', ' ')} {getattr(f, k)}" for k in ("min_length", "max_length") if getattr(f, k)]
        rules += ["optional"] if f.optional else []
        rules += [f'separators "{f.separators}"'] if f.separators else []
        rules += [f"pattern '{f.pattern}'"] if f.pattern else []
        rules += [f"{f.check} check digit"] if f.check else []
        what = f"written freely in box {list(f.box)}" if f.kind == "free" else f"{len(f.cells)} boxes"
        click.echo(f"{f.name}: {what}" + (f" ({', '.join(rules)})" if rules else ""))
    if tpl.review_risk is not None or tpl.document != "form":  # and whether the shipped models hold a threshold for it
        boxed, free = _review_thresholds(_load_classifier(None), None, [tpl])[0]
        risk = "the models' own risk" if tpl.review_risk is None else f"review_risk {tpl.review_risk:g}"
        click.echo(f"{risk} on a {tpl.document}: fields less sure than {boxed} (boxed) or {free} (free) go to review")


@main.command()
@click.argument("page_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--template", "-t", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
@click.option("--page", "page_number", default=1, show_default=True, type=click.IntRange(1), help="Page of a PDF or TIFF.")
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--review-threshold", type=click.FloatRange(0, 1), help="As for `process`.")
@REVIEW_RISK_OPTION
def inspect(page_file, template, out, page_number, model, review_threshold, review_risk) -> None:
    """Draw the registered page with its cells, digits and confidences (review in orange)."""
    import cv2

    from formreader.pipeline import read_segmented, segment_page
    from formreader.reading.ingest import PageError, read_pages
    from formreader.reading.register import RegistrationError
    from formreader.review.overlay import draw_overlay

    tpl = _at_risk([_load_template(template)], review_risk, review_threshold)[0]
    clf = _load_classifier(model)
    page = None
    for item in read_pages(page_file, pdf_dpi=int(tpl.dpi), reduce_jpeg=True):  # as `process` reads it
        if item.page == page_number or (isinstance(item, PageError) and item.page == 0):
            page = item
            break
    if page is None:
        _fail(f"{page_file} has no page {page_number}", 1)
    if isinstance(page, PageError):
        _fail(f"{page_file}: {page.reason}", 1)
    _review_thresholds(clf, review_threshold, [tpl])
    try:
        seg = segment_page(page, tpl)
    except RegistrationError as e:
        _fail(f"{page_file} page {page_number}: {e}", 1)
    read = read_segmented(seg, tpl, clf, review_threshold)
    if not cv2.imwrite(str(out), draw_overlay(seg.registration.aligned, read)):
        _fail(f"cannot write {out}", 1)
    for f in read.fields:
        click.echo(
            f"{f.name:16s} {f.value:>12s}  {f.confidence:.3f}  {f.status}" + (f"  ({'; '.join(f.reasons)})" if f.reasons else "")
        )
    click.echo(f"registration quality {read.quality:.2f}, rotation {read.rotation_deg:.1f} deg; picture: {out}")


@main.command()
@DATA_OPTION
@click.option(
    "--out", "-o", default=Path("models/digits.keras"), show_default=True, type=click.Path(dir_okay=False, path_type=Path)
)
@FORCE_OPTION
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--limit", type=click.IntRange(50), help="Train on this many images of each source only (quick trials).")
@click.option("--seed", default=20261124, show_default=True, type=int)
@click.option("--learning-rate", default=2e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--width", default=2.0, show_default=True, type=click.FloatRange(0.25, 4), help="The CNN's channel multiplier.")
@click.option(
    "--depth", default=1, show_default=True, type=click.IntRange(1, 2), help="2: the deeper network (the companion)."
)
@click.option(
    "--stretch", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Share of each batch stretched to a square."
)
@click.option(
    "--narrow", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Share of each batch squeezed narrow."
)
@click.option(
    "--patience", default=10, show_default=True, type=click.IntRange(1), help="Epochs without progress before stopping."
)
@click.option("--mnist-only", is_flag=True, help="Train on MNIST alone (no CVL or ORAND digits), as the first model was.")
@click.option(
    "--scanned",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Add this share of the training digits again as a scanned form's box gives them (a quarter bitonal).",
)
@click.option(
    "--written",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Add this share of the real crops again as written into a form's box and scanned (half bitonal).",
)
@click.option(
    "--forms",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Add the cells of this many scanned forms of each style (per source; a quarter for validation), "
    "written inside and across their boxes' lines and read as a page is.",
)
@click.option(
    "--strings",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Also train on the pieces of this many free-written numbers.",
)
@click.option(
    "--initial", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Start from this model (fine-tune)."
)
@click.option(
    "--extra",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also learn these labelled digits (DIGIT/NAME.png): the corrections folder the review station fills.",
)
@click.option(
    "--prepared",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The prepared training splits (.npz): read if it exists, else built and written there.",
)
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Build the splits, write them to --prepared and stop, training nothing: what a machine with an "
    "accelerator is given to train on (models/MODEL_CARD.md).",
)
@TIME_LIMIT_OPTION
def train(
    data,
    out,
    force,
    epochs,
    limit,
    seed,
    learning_rate,
    width,
    depth,
    stretch,
    narrow,
    patience,
    mnist_only,
    scanned,
    written,
    forms,
    strings,
    initial,
    extra,
    prepared,
    prepare_only,
    time_limit,
) -> None:
    """Train the digit CNN on MNIST, CVL's training writers and ORAND's training checks.

    Runs on whatever Keras backend is set (KERAS_BACKEND; a GPU when the backend sees one).
    """
    from formreader.training.train import TrainConfig, build_training_data, train_model

    if prepare_only and not prepared:
        _fail("--prepare-only writes the splits to --prepared FILE; name the file")
    if prepare_only and prepared.exists() and not force:
        _fail(f"{prepared} exists; pass --force to build it again, or choose another --prepared")
    if not prepare_only:
        _need("keras", "train")
    if out.exists() and not force and not prepare_only:
        _fail(f"{out} exists; pass --force to overwrite it, or choose another --out")
    config = TrainConfig(
        epochs=epochs,
        limit=limit,
        seed=seed,
        learning_rate=learning_rate,
        width=width,
        depth=depth,
        stretch=stretch,
        narrow=narrow,
        scanned=scanned,
        written=written,
        forms=forms,
        patience=patience,
        cvl=not mnist_only,
        orand=not mnist_only,
        strings=strings,
        initial=str(initial) if initial else None,
        extra=str(extra) if extra else None,
        time_limit=time_limit,
    )
    if prepare_only:
        splits = build_training_data(config, data)
        splits.save(prepared)
        click.echo(f"{prepared}: {len(splits.y_train)} training and {len(splits.y_val)} validation images; nothing trained")
        return
    meta = train_model(out, config, data=_prepared_splits(prepared, config, data))
    click.echo(f"{out}: {meta['parameters']} parameters, {meta['epochs_run']} epochs in {meta['training_seconds']:.0f} s")


@main.command("export")
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--xlsx", "xlsx", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The workbook to write.")
def export_results(results, xlsx) -> None:
    """Write RESULTS (the CSV of `process --out`) as a spreadsheet: a row per page, a column per
    field, values as text (leading zeros kept), cells needing review filled with the reasons as
    a comment; sheets of errors and of the run's settings."""
    from formreader.export import NotResultsError, write_workbook

    _need("openpyxl", "xlsx")
    if xlsx.suffix.lower() != ".xlsx":
        _fail(f"--xlsx {xlsx}: the workbook's name must end in .xlsx")
    try:
        pages = write_workbook(results, xlsx)
    except NotResultsError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {xlsx}: {e.strerror or e}")
    click.echo(f"{xlsx}: {pages} pages")


@main.command("train-strings")
@DATA_OPTION
@click.option(
    "--out", "-o", default=Path("models/strings.keras"), show_default=True, type=click.Path(dir_okay=False, path_type=Path)
)
@FORCE_OPTION
@click.option("--epochs", default=28, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1), help="Batches of 64 fields per epoch.")
@click.option(
    "--real-share", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Share of ORAND amounts in a batch."
)
@click.option("--learning-rate", default=2e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option(
    "--initial",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Start from this string model (go on training).",
)
@click.option(
    "--average-with",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Then average the weights with this model's (the --initial one), kept if the validation loss is lower.",
)
@click.option("--seed", default=20261124, show_default=True, type=int)
@click.option(
    "--narrow", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Share of composed digits written narrow."
)
@click.option(
    "--prepared",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The digit model's prepared training splits (.npz, see `train --prepared`): read if it exists, else built.",
)
@TIME_LIMIT_OPTION
def train_strings(
    data, out, force, epochs, steps, real_share, learning_rate, initial, average_with, seed, narrow, prepared, time_limit
) -> None:
    """Train the string model (CNN + CTC) on fields composed from the digit model's training
    digits and on ORAND's training check amounts (its test checks are never read)."""
    _need("keras", "train")
    from formreader.training.train import TrainConfig
    from formreader.training.train_strings import StringTrainConfig, train_string_model

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to overwrite it, or choose another --out")
    import numpy as np

    splits = _prepared_splits(prepared, TrainConfig(), data)

    keep = splits.y_train < 10  # not-a-digit images are not written into fields
    train = np.round(splits.x_train[keep] * 255).astype(np.uint8), splits.y_train[keep], splits.source_train[keep]
    keep = splits.y_val < 10
    val = np.round(splits.x_val[keep] * 255).astype(np.uint8), splits.y_val[keep]
    config = StringTrainConfig(
        epochs=epochs,
        steps=steps,
        seed=seed,
        real_share=real_share,
        learning_rate=learning_rate,
        initial=str(initial) if initial else None,
        average_with=str(average_with) if average_with else None,
        narrow=narrow,
        time_limit=time_limit,
    )
    meta = train_string_model(out, config, *train, *val, data)
    click.echo(f"{out}: {meta['parameters']} parameters in {meta['training_seconds']:.0f} s; {meta['validation_fields_right']}")


@main.command("train-struck")
@DATA_OPTION
@click.option(
    "--out", "-o", default=Path("models/digits.struck.keras"), show_default=True, type=click.Path(dir_okay=False, path_type=Path)
)
@FORCE_OPTION
@click.option(
    "--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The digit model whose writers it trains on."
)
@click.option("--pages", default=120, show_default=True, type=click.IntRange(1), help="Training forms a source and form style.")
@click.option("--epochs", default=12, show_default=True, type=click.IntRange(1))
@click.option(
    "--validation-pages", type=click.IntRange(1), help="Validation forms a source and style, for the threshold (default: 80)."
)
@click.option("--seed", default=60, show_default=True, type=int)
def train_struck(data, out, force, model, pages, epochs, validation_pages, seed) -> None:
    """Train the detector of digits struck through (boxed cells and free fields on forms; beside the
    digit model) on forms written by the digit model's training writers, and choose its thresholds
    on its validation writers'."""
    _need("keras", "train")
    from formreader.training.train_struck import train_struck as train

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to overwrite it, or choose another --out")
    card = train(out, model, pages, epochs, seed, validation_pages, data)
    for kind, key in (("boxed", "validation"), ("free", "validation_free")):
        v = card[key]
        click.echo(f"{out}: {kind} fields' threshold {v['threshold']:.4f}, {v['flagged_share']:.2%} of {v['fields']} validation "
                   f"fields flagged that went out `ok`, {v['struck_ok']} of {v['struck_fields']} struck ones out `ok` "
                   f"({v['struck_ok_unaided']} without it)")


@main.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), help="Folder holding the data sets (mnist/, ...).")
@click.option(
    "--nsysu", type=click.Path(dir_okay=False, path_type=Path), help="nsysu_digits.npz; default ../shared/data/nsysu_digits."
)
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("evaluation"),
    show_default=True,
    help="Folder for the PNG plots.",
)
@click.option(
    "--before",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Another model (the one fine-tuned from, say) to measure on the same held-out sources, for a before/after.",
)
def evaluate(model, data, nsysu, plots, before) -> None:
    """Accuracy, calibration and risk-coverage on MNIST test; every held-out source of writers."""
    _need("matplotlib", "train")
    from formreader.training.evaluate import (
        evaluate_classifier,
        evaluate_sources,
        format_report,
        format_sources,
        held_out_digits,
        write_plots,
    )

    clf = _load_classifier(model)
    ev = evaluate_classifier(clf, data / "mnist" if data else None)
    click.echo(format_report(ev))
    click.echo("\nWriters never trained on, each crop through read_digits (segmentation included):")
    sources = held_out_digits(data, nsysu, as_labelled=True)
    click.echo(format_sources(evaluate_sources(clf, sources)))
    if clf.companion is not None:
        click.echo(f"\nThe digit network alone, without {Path(clf.companion.path).name}:")
        click.echo(format_sources(evaluate_sources(clf, sources, alone=True)))
    if before:
        click.echo(f"\nBefore ({before}), the same sources:")
        click.echo(format_sources(evaluate_sources(_load_classifier(before), sources)))
    for p in write_plots(ev, plots):
        click.echo(f"plot: {p}")


# `calibrate` and `calibrate-strings` choose a review threshold the same way, for a share of risk.
RISK_OPTION = click.option(
    "--risk",
    default=REVIEW_RISK,
    show_default=True,
    type=click.FloatRange(0, 0.5),
    help="The share of the validation fields the review threshold may let out wrong.",
)

@main.command()
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Default: the shipped model.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), help="Folder holding mnist/ and cvl_digits/.")
@click.option(
    "--pages", default=CALIBRATION_PAGES, show_default=True, type=click.IntRange(1), help="Forms per source and form style."
)
@RISK_OPTION
def calibrate(model, data, pages, risk) -> None:
    """Calibrate a model's digits read by its two networks on its validation split, then its field
    confidence on forms of its validation writers, and choose its review threshold for boxed
    fields; writes its card."""
    import json

    from formreader.training.evaluate import calibrate_fields, fit_pair_temperature

    clf = _load_classifier(model)
    card = Path(clf.path).with_suffix(".json")
    meta = json.loads(card.read_text())
    if clf.companion is not None:
        # First the pair's digits, then the fields made of them.
        clf.meta["pair_temperature"] = meta["pair_temperature"] = round(fit_pair_temperature(clf, data), 4)
    result = calibrate_fields(clf, pages, data_dir=data, risk=risk)
    meta["field_power"] = round(result["field_power"], 4)
    meta["field_power_bitonal"] = round(result["field_power_bitonal"], 4)
    meta["review_threshold"] = result["review_threshold"]
    meta["review_risk"] = risk
    meta["review_thresholds"] = result["review_thresholds"]  # for templates that accept another risk
    meta["field_calibration"] = {k: v for k, v in result.items() if k not in meta} | {"pages": pages}
    card.write_text(json.dumps(meta, indent=2) + "\n")
    pair = f"pair_temperature {meta['pair_temperature']}; " if clf.companion is not None else ""
    click.echo(
        f"{card}: {pair}field_power {meta['field_power']} (grey scans), {meta['field_power_bitonal']} (bitonal; "
        f"{result['fields']} fields, {result['bitonal_fields']} bitonal, {result['right']:.1%} right); "
        f"review_threshold {meta['review_threshold']} ({result['flagged']:.1%} flagged, "
        f"{result['wrong_not_flagged']} wrong not flagged)"
    )
    click.echo(_risk_table(meta))


def _risk_table(meta: dict) -> str:
    """The thresholds a card holds for the risks a template may accept (its review_risk)."""
    return "for a template's review_risk: " + ", ".join(f"{r} -> {t}" for r, t in meta["review_thresholds"].items())


@main.command("calibrate-strings")
@click.option(
    "--model", type=click.Path(dir_okay=False, path_type=Path), help="The digit model; its string model lies beside it."
)
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), help="Folder holding mnist/ and orand_car_a/.")
@click.option("--checks", default=150, show_default=True, type=click.IntRange(10), help="Generated checks to fit on.")
@click.option(
    "--forms",
    default=CALIBRATION_FREE_FORMS,
    show_default=True,
    type=click.IntRange(1),
    help="Free-field forms to fit on, per population of writers.",
)
@RISK_OPTION
def calibrate_strings(model, data, checks, forms, risk) -> None:
    """Fit how the two readers choose a free field's reading and the confidence in it, and choose
    free fields' review threshold, on validation fields: ORAND's validation checks, generated
    checks of the digit model's validation digits and free-field forms of its validation writers;
    writes the string model's card."""
    import json

    import numpy as np

    from formreader.training.evaluate import (
        CALIBRATION_FIELD_DOCUMENTS,
        CALIBRATION_FIELD_SOURCES,
        CUT_WEIGHTS,
        STRINGS_CALIBRATION_SEED,
        fit_cut_weight,
        fit_free_threshold,
        fit_two_readers,
        read_free_fields,
        two_reader_calibration_fields,
    )

    clf = _load_classifier(model, calibrating=True)
    if clf.string_model is None:
        _fail(f"no string model beside {clf.path} (train one with `formreader train-strings`)")
    crops, specs, truths, sources = two_reader_calibration_fields(clf, checks, STRINGS_CALIBRATION_SEED, data, forms)
    # First how the two readers choose a field's reading, then the confidence in what they choose.
    readings = read_free_fields(clf, crops, specs, cut_weight=float(CUT_WEIGHTS.max()))
    cut_weight = fit_cut_weight(readings, truths, sources)
    readings = [r.chosen(cut_weight) for r in readings]
    weights = fit_two_readers(readings, truths, sources)
    card = Path(clf.string_model.path).with_suffix(".json")
    meta = json.loads(card.read_text())
    read_right = np.array([r.value == t for r, t in zip(readings, truths)])
    right = read_right.mean()
    meta["cut_weight"] = cut_weight
    meta["field_calibration"] = [round(w, 4) for w in weights]
    # Then the threshold, on the confidence the card gives (its rounded weights), as a free field is decided.
    documents = np.array(CALIBRATION_FIELD_DOCUMENTS)[sources]
    decision = fit_free_threshold(readings, crops, specs, truths, meta["field_calibration"], risk, documents)
    meta["review_threshold"] = decision["review_threshold"]
    meta["review_risk"] = risk
    meta["review_thresholds"] = decision["review_thresholds"]  # for templates that accept another risk
    # and for a template's kind of paper (its `document`), chosen on that kind's fields alone
    meta["review_thresholds_by_document"] = decision["review_thresholds_by_document"]
    meta["field_calibration_fit"] = {
        "fields": len(readings),
        "read_right": round(float(right), 4),
        "checks": checks,
        "forms": forms,
        "flagged": round(decision["flagged"], 4),
        "wrong_not_flagged": decision["wrong_not_flagged"],
    }
    card.write_text(json.dumps(meta, indent=2) + "\n")
    click.echo(
        f"{card}: cut_weight {cut_weight}, field_calibration {meta['field_calibration']} on {len(readings)} fields "
        f"({right:.1%} read right whole); review_threshold {meta['review_threshold']} ({decision['flagged']:.1%} "
        f"flagged, {decision['wrong_not_flagged']} wrong not flagged)"
    )
    click.echo(_risk_table(meta))
    for kind, table in meta["review_thresholds_by_document"].items():
        listed = ", ".join(f"{r} -> {t}" for r, t in table.items())
        click.echo(f"  on {kind} fields alone (a template's document: {kind}): {listed}")
    # Per source: a new string model can gain on one and lose on another (models/MODEL_CARD.md).
    click.echo("read right whole: " + ", ".join(
        f"{name} {read_right[sources == k].mean():.1%} of {int((sources == k).sum())}"
        for k, name in enumerate(CALIBRATION_FIELD_SOURCES) if (sources == k).any()
    ))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path))
def pad(host, port, model) -> None:
    """A drawing pad in the browser: write a number, see what formreader reads.

    On 127.0.0.1 (the default) it answers this machine only. Bound beyond loopback (--host
    0.0.0.0) it asks every request for a random token, given in the URL it prints."""
    _need("flask", "web")
    import secrets

    from formreader.review.server import create_app, is_loopback

    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"formreader drawing pad on {url} (Ctrl-C to stop)")
    create_app(model, token=token).run(host=host, port=port, threaded=True)


@main.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--port", default=8766, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--reviewer", help="The name written with each decision; default: your login name.")
def review(results, port, reviewer) -> None:
    """Check the flagged fields of RESULTS (the CSV of `process --out`) in the browser.

    Serves a page on 127.0.0.1 with a random token in its URL: the flagged fields least sure
    first, each cut from its page; Enter accepts the reading or saves what you typed, x marks it
    unreadable, the arrow keys go back and forth. Each decision is kept at once (RESULTS'
    .reviews.jsonl) and written into the CSVs (and the .xlsx beside them, if there is one) in the
    background, so that a click never waits for a large batch's files."""
    _need("flask", "web")
    import getpass
    import secrets

    from werkzeug.serving import make_server

    from formreader.export import OutputBusyError, OutputLock
    from formreader.review.server import create_review_app

    token = secrets.token_urlsafe(24)
    # SIGTERM (`kill`) stops the station as Ctrl-C does: the last decisions written into the results.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app = create_review_app(results, reviewer or getpass.getuser(), token)
    except (FileNotFoundError, OSError) as e:
        _fail(str(e))
    try:
        with OutputLock(results):  # no `process` may rewrite these results meanwhile
            try:
                server = make_server("127.0.0.1", port, app, threaded=True)
            except OSError as e:
                _fail(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e} (try --port 0)")
            click.echo(f"formreader review station on http://127.0.0.1:{server.server_port}/?token={token} (Ctrl-C to stop)")
            sys.stdout.flush()
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                app.extensions["formreader.results_writer"].wait(timeout=60)  # the last decisions into the CSVs
                click.echo("\nformreader: review stopped; every decision made is kept", err=True)
    except OutputBusyError as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
