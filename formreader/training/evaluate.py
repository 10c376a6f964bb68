"""Measuring a digit classifier: accuracy, confusion, calibration, risk-coverage, real digits.

The metric functions take arrays and return numbers or arrays; `evaluate_classifier` runs them
on the MNIST test split, `evaluate_sources` on every source of writers no model trains on
(each crop segmented and normalised by formreader's own code, exactly as a cell of a form is),
and `write_plots` draws the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from formreader.reading.classify import CALIBRATION_FREE_FORMS, CALIBRATION_PAGES, NOT_A_DIGIT, DigitClassifier
from formreader.reading.segment import segment_crops
from formreader.training.datasets import load_mnist, load_nsysu


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = 11) -> np.ndarray:
    """(classes, classes) counts; row = true class, column = predicted class."""
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |accuracy - confidence|,
    weighted by the share of samples in the bin. probabilities: (N, C); labels: (N,)."""
    return calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, bins)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE of any confidence (N,) in [0, 1] against whether each was right, correct (N,) bool (a
    digit's top class, a field's value)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error rate among accepted samples when only the k most confident are accepted, k = 1..N.

    Returns (coverage, risk), each (N,): coverage k/N and the error rate of those k.
    """
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(~correct[order])
    k = np.arange(1, len(order) + 1)
    return k / len(order), errors / k


def risk_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Error rate among the accepted when the least confident (1 - coverage) go to review."""
    cov, risk = risk_coverage(confidence, correct)
    k = max(1, int(np.floor(coverage * len(cov))))
    return float(risk[k - 1])


def rate_interval(count: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (Wilson score) interval of a rate seen as `count` of `total`: a handful of wrong
    fields let through is a noisy figure, and the aims are rates of a few per thousand."""
    if total <= 0:
        return 0.0, 1.0
    p = count / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass
class Evaluation:
    accuracy: float
    ece: float
    nll: float
    risk_at_99: float  # error among the rest, the 1% least confident sent to review
    confusion: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray
    extra: dict = field(default_factory=dict)


def evaluate_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> Evaluation:
    """All MNIST-style figures for probabilities (N, 11) and labels (N,)."""
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    confidence = probabilities.max(axis=1)
    coverage, risk = risk_coverage(confidence, correct)
    nll = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1)).mean())
    return Evaluation(
        accuracy=float(correct.mean()),
        ece=expected_calibration_error(probabilities, labels),
        nll=nll,
        risk_at_99=risk_at_coverage(confidence, correct, 0.99),
        confusion=confusion_matrix(labels, predicted),
        coverage=coverage,
        risk=risk,
    )


def evaluate_classifier(classifier: DigitClassifier, mnist_dir: Path | None = None) -> Evaluation:
    """Evaluate on the MNIST test split, its 28x28 images fed to the model as they are."""
    x, y = load_mnist("test", mnist_dir)
    return evaluate_probabilities(classifier.probabilities(x.astype(np.float32) / 255.0), y.astype(np.int64))


def format_report(ev: Evaluation) -> str:
    """The evaluation as text for the terminal and the model card."""
    errors = int(round((1 - ev.accuracy) * len(ev.coverage)))
    lines = [
        f"MNIST test accuracy:          {ev.accuracy:.2%}  ({errors} errors of {len(ev.coverage)})",
        f"Expected calibration error:   {ev.ece:.3%}",
        f"Negative log-likelihood:      {ev.nll:.4f}",
        f"Error with 1% sent to review: {ev.risk_at_99:.3%}",
    ]
    for cov in (1.0, 0.995, 0.99, 0.98, 0.95):
        k = max(1, int(np.floor(cov * len(ev.coverage))))
        lines.append(f"  coverage {cov:6.1%}: error among accepted {ev.risk[k - 1]:.3%}")
    lines.append("Confusion matrix (rows: true 0-9, columns: predicted 0-9 and not-a-digit):")
    for d in range(10):
        lines.append("  " + str(d) + " " + " ".join(f"{v:5d}" for v in ev.confusion[d]))
    return "\n".join(lines)


def write_plots(ev: Evaluation, out_dir: Path) -> list[Path]:
    """Risk-coverage curve and confusion matrix as PNG files in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(1 - ev.coverage, ev.risk * 100)
    ax.set_xlabel("fraction sent to review")
    ax.set_ylabel("error among accepted digits (%)")
    ax.set_xlim(0, 0.05)
    ax.set_title("Risk-coverage, MNIST test")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    curve = out_dir / "risk_coverage.png"
    fig.savefig(curve, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 5))
    m = ev.confusion[:10].astype(float)
    off = m.copy()
    np.fill_diagonal(off, 0)
    ax.imshow(off, cmap="Reds")
    for i in range(10):
        for j in range(11):
            if ev.confusion[i, j]:
                ax.text(j, i, str(ev.confusion[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(11), [str(d) for d in range(10)] + ["X"])
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted (X: not a digit)")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix, MNIST test (errors shaded)")
    fig.tight_layout()
    conf = out_dir / "confusion_matrix.png"
    fig.savefig(conf, dpi=120)
    plt.close(fig)
    return [curve, conf]


# ---------------------------------------------------------------------------------------------
# Writers never trained on: every held-out source through read_digits' own path
# ---------------------------------------------------------------------------------------------


@dataclass
class SourceFigures:
    """One held-out source read as read_digits reads it (segmentation included)."""

    source: str
    digits: int
    accuracy: float  # a crop judged blank or read as not-a-digit counts as wrong
    ece: float
    blank: int  # crops judged blank
    refused: int  # read as not-a-digit
    wrong_confident: int  # wrong at confidence >= 0.85 (the default review threshold)
    confident: int  # read at confidence >= 0.85


def held_out_digits(
    data_dir: Path | None = None, nsysu_path: Path | None = None, as_labelled: bool = False
) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """The single-digit sets no model of formreader trains on, as grey crops (dark ink on light
    paper) with their labels: MNIST test, CVL's validation writers, NSYSU exam boxes, and the
    ORAND-CAR-A digits of the 'test' checks cut by their boxes. Sources not found are left out.
    data_dir: the folder holding the data sets (default: formreader.training.datasets.default_data_dir).
    as_labelled: also ORAND's test digits by their labels as distributed (some contradict their
    images: datasets.ORAND_RELABELLED), for the figure before the correction."""
    from formreader.training.datasets import load_cvl, load_orand, orand_digit_crops

    root = Path(data_dir) if data_dir else None
    here = lambda *parts: root.joinpath(*parts) if root else None  # noqa: E731

    def mnist_test():
        x, y = load_mnist("test", here("mnist"), False)
        return list(255 - x), y  # as scanned: dark ink on light paper

    sets: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    loaders = {
        "MNIST test": mnist_test,
        "CVL validation writers": lambda: load_cvl("valid", here("cvl_digits", "cvl_valid.npz"))[:2],
        "NSYSU exam boxes": lambda: load_nsysu(nsysu_path or here("nsysu_digits", "nsysu_digits.npz"))[:2],
        "ORAND test checks": lambda: orand_digit_crops(load_orand("test", here("orand_car_a")))[:2],
    }
    if as_labelled:
        loaders["ORAND test, as labelled"] = lambda: orand_digit_crops(load_orand("test", here("orand_car_a"), False))[:2]
    for name, load in loaders.items():
        try:
            crops, labels = load()
        except FileNotFoundError:
            continue
        sets[name] = (list(crops), np.asarray(labels, np.int64))
    # The same writers' digits as postal-code sets give them (USPS: 16x16, the digit filling the
    # square): strokes on every edge of the crop, where a box's lines would be.
    for name, tight in (("MNIST test", "MNIST test, 16x16 tight"), ("CVL validation writers", "CVL valid., 16x16 tight")):
        if name in sets:
            crops, labels = sets[name]
            sets[tight] = ([cut_tight(c) for c in crops], labels)
    return sets


def cut_tight(crop: np.ndarray, side: int = 16) -> np.ndarray:
    """A digit's crop as postal-code data sets give it: cut to its ink and scaled (INTER_AREA),
    aspect kept, so that its longer side fills a `side` x `side` square of paper.

    crop: (H, W) uint8, dark ink on light paper, one digit. Returns (side, side) uint8. Ink: the
    pixels darker than halfway between the paper (the 90th percentile) and the darkest pixel.
    """
    crop = np.asarray(crop, np.uint8)
    paper, darkest = np.percentile(crop, 90), float(crop.min())
    ys, xs = np.nonzero(crop < (paper + darkest) / 2)
    if len(ys):
        crop = crop[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = side / max(h, w)
    small = cv2.resize(crop, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    out = np.full((side, side), int(paper), np.uint8)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def held_out_writers(log=print) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits of writers no model was trained on, to write into generated forms and checks, and
    their labels: MNIST test as (N, 28, 28) uint8 ink high on 0; CVL's validation writers and
    NSYSU exam boxes as glyphs of their crops' own ink and size (synth.ink_on_black). Sets not
    found are left out, and `log` says so."""
    from formreader.training.datasets import load_cvl
    from formreader.training.synth import ink_on_black

    sources = {"MNIST test": load_mnist("test")}
    try:
        x, y, _ = load_cvl("valid")
        sources["CVL validation writers"] = ink_on_black(x, y)
        x, y, _ = load_nsysu()
        sources["NSYSU exam boxes"] = ink_on_black(x, y)
    except FileNotFoundError as e:
        log(f"  left out: {e}")
    return sources


def evaluate_sources(
    classifier: DigitClassifier, sets: dict, threshold: float = 0.85, alone: bool = False
) -> list[SourceFigures]:
    """Per-source figures for crops read through segmentation and the classifier, as `read_digits`
    and a form's boxed cells read them (DigitClassifier.cell_probabilities: the network and its
    companion); with `alone`, by the network alone (DigitClassifier.probabilities)."""
    rows = []
    for name, (crops, labels) in sets.items():
        images, index = segment_crops(crops)
        probs = np.zeros((len(crops), 11))
        probs[:, NOT_A_DIGIT] = 1.0  # a crop judged blank: no digit read
        if len(index):
            probs[index] = classifier.probabilities(images) if alone else classifier.cell_probabilities(images)
        predicted, confidence = probs.argmax(1), probs.max(1)
        correct = predicted == labels
        sure = confidence >= threshold
        rows.append(
            SourceFigures(
                name,
                len(crops),
                float(correct.mean()),
                expected_calibration_error(probs, labels),
                int(len(crops) - len(index)),
                int((predicted[index] == NOT_A_DIGIT).sum()),
                int((sure & ~correct).sum()),
                int(sure.sum()),
            )
        )
    return rows


def fit_pair_temperature(classifier: DigitClassifier, data_dir: Path | None = None) -> float:
    """The temperature of a network and its companion's mean (DigitClassifier.pair_mean; the
    card's `pair_temperature`), fitted as a network's own is (fit_balanced_temperature: each
    source weighted alike) on the model's validation split (its MNIST digits, CVL writers and
    ORAND checks, and not-a-digit ink), the digits as read_digits reads them. Both networks are
    calibrated alone, and their mean is less sure than either where they agree (model card)."""
    from dataclasses import replace

    from formreader.training.train import TrainConfig, build_training_data, fit_balanced_temperature

    config = replace(TrainConfig.from_card(classifier.meta.get("config", {})), extra=None)
    data = build_training_data(config, data_dir, log=lambda *_: None)
    return fit_balanced_temperature(classifier.pair_logits(data.x_val), data.y_val, data.source_val)


def format_sources(rows: list[SourceFigures]) -> str:
    """The per-source table as text."""
    lines = [
        f"{'held-out source':24} {'digits':>6} {'accuracy':>9} {'ECE':>7} {'blank':>5} {'refused':>7} {'wrong at >=0.85':>16}"
    ]
    for r in rows:
        lines.append(
            f"{r.source:24} {r.digits:6d} {r.accuracy:9.2%} {r.ece:7.2%} {r.blank:5d} {r.refused:7d} "
            f"{r.wrong_confident:5d} of {r.confident:<6d}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Field confidence: calibrated on forms of held-out validation writers
# ---------------------------------------------------------------------------------------------


def fit_power(confidence: np.ndarray, right: np.ndarray) -> float:
    """The exponent a maximising the likelihood of `right` (N,) bool under confidence ** a,
    confidence (N,) in (0, 1] (golden section over log a, a in 0.05..5)."""
    c = np.clip(np.asarray(confidence, np.float64), 1e-9, 1 - 1e-9)
    right = np.asarray(right, bool)

    def loss(log_a: float) -> float:
        p = np.clip(c ** np.exp(log_a), 1e-9, 1 - 1e-9)
        return float(-(np.log(p[right]).sum() + np.log1p(-p[~right]).sum()))

    lo, hi = np.log(0.05), np.log(5.0)
    g = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


# The seed of the forms `formreader calibrate` fits field confidence on (CALIBRATION_PAGES of each source and style).
CALIBRATION_SEED = 31
# The seed of the free fields `formreader calibrate-strings` fits on (two_reader_calibration_fields).
STRINGS_CALIBRATION_SEED = 47


def calibration_forms(
    meta: dict,
    pages: int,
    seed: int,
    data_dir: Path | None = None,
    size: tuple[float, float] | None = None,
    keep: Callable[[str, str], bool] | None = None,
    struck: bool = False,
) -> list:
    """Scanned forms of every style filled with the model's own validation digits (MNIST digits,
    CVL writers and ORAND checks held out from its training, as its card records): three
    populations of writers, so that the calibration is not one population's. `size`: how tall the
    digits are written (synth.write_digit; default the benchmarks' WRITING_SIZE). `keep`: (source,
    style) -> whether to make those forms (default all; each source and style's forms are the
    same whichever others are made). `struck`: a digit of each page struck through (synth.make_pages).
    [(source, style, template, [(page, truth)])]."""
    from formreader.training.datasets import load_cvl, load_orand, orand_digit_crops
    from formreader.training.synth import FORM_STYLES, WRITING_SIZE, ink_on_black, scanned_forms
    from formreader.training.train import TrainConfig, mnist_split

    root = Path(data_dir) if data_dir else None
    config = TrainConfig.from_card(meta.get("config", {}))
    images, labels = load_mnist("train", root / "mnist" if root else None, False)
    val, _ = mnist_split(len(images), config, np.random.default_rng(config.seed))
    sources = {"MNIST validation digits": (images[val], labels[val])}
    writers = meta.get("held_out", {}).get("cvl_validation_writers", [])
    if writers:
        x, y, w = load_cvl("train", root / "cvl_digits" / "cvl_train.npz" if root else None)
        theirs = np.isin(w, writers)
        sources[f"CVL's {len(writers)} validation writers"] = ink_on_black(x[theirs], y[theirs])
    checks = set(meta.get("held_out", {}).get("orand_validation_checks", []))
    if checks:
        amounts = [a for a in load_orand("val", root / "orand_car_a" if root else None) if a.name in checks]
        crops, y, _ = orand_digit_crops(amounts)
        sources[f"ORAND's {len(amounts)} val checks"] = ink_on_black(crops, y)
    return [
        (source, style, *scanned_forms(style, im, lab, pages, seed, size=size or WRITING_SIZE, struck=struck))
        for source, (im, lab) in sources.items()
        for style in FORM_STYLES
        if keep is None or keep(source, style)
    ]


def calibrate_fields(
    classifier: DigitClassifier,
    pages: int = CALIBRATION_PAGES,
    seed: int = CALIBRATION_SEED,
    data_dir: Path | None = None,
    risk: float | None = None,
) -> dict:
    """Fit a model's boxed-field decision (`fit_field_decision`: the confidence exponents of
    DigitClassifier.field_power and its review threshold) on forms of its validation writers,
    their cells read as a page's boxed cells are (DigitClassifier.cell_probabilities); the
    exponents are the least sure of those its sources of writers call for alone."""
    forms = calibration_forms(classifier.meta, pages, seed, data_dir)
    records, sources = calibration_records(forms, {"": classifier.cell_probabilities})
    return fit_field_decision(*records[""], risk, sources)


def calibration_records(forms: list, readers: dict) -> tuple[dict, np.ndarray]:
    """`boxed_field_records` of `calibration_forms`' forms, and the source of writers each field
    was written by, (N,) str (the fields of one source together, in the forms' order)."""
    records: dict = {name: [] for name in readers}
    sources: list[str] = []
    for source in dict.fromkeys(source for source, *_ in forms):
        part = boxed_field_records([(t, items) for s, _, t, items in forms if s == source], readers)
        for name in readers:
            records[name].append(part[name])
        sources += [source] * len(next(iter(part.values()))[0])
    return {name: tuple(np.concatenate(x) for x in zip(*parts)) for name, parts in records.items()}, np.array(sources)


def boxed_field_records(sets: list, readers: dict) -> dict:
    """Every boxed field of generated forms, decided with each reader's cell probabilities:
    sets [(template, [(page, truth)])], readers {name: images (N, 28, 28) -> probabilities (N, 11)}.
    Returns {name: (right, confidence, ruled, bitonal)}, each (N,): the value right, the plain
    product of the cells' probabilities (power 1), a rule broken (threshold 0: only rules give
    reasons), the page a bitonal scan. Pages that do not register are left out."""
    from formreader.pipeline import decide_page, digit_images, segment_page
    from formreader.reading.register import RegistrationError, prepare_reference

    rows: dict = {name: [] for name in readers}
    for template, items in sets:
        features = prepare_reference(template.reference)
        boxed = [spec.kind != "free" for spec in template.fields]
        for page, truth in items:
            try:
                seg = segment_page(page, template, features)
            except RegistrationError:
                continue
            images = digit_images(seg)[0]
            for name, probabilities in readers.items():
                read = decide_page(seg, probabilities(images), template, 0.0, 1.0)
                rows[name] += [
                    (f.value == truth[f.name], f.confidence, bool(f.reasons), seg.bitonal)
                    for f, keep in zip(read.fields, boxed)
                    if keep
                ]
    return {
        name: (np.array([r[0] for r in rs], bool), np.array([r[1] for r in rs], np.float64),
               np.array([r[2] for r in rs], bool), np.array([r[3] for r in rs], bool))
        for name, rs in rows.items()
    }


# Fewest fields of one source and kind of scan whose exponent is fitted on its own (fit_field_decision).
SOURCE_FIELDS = 100


def fit_field_decision(
    right: np.ndarray,
    confidence: np.ndarray,
    ruled: np.ndarray,
    bitonal: np.ndarray,
    risk: float | None = None,
    sources: np.ndarray | None = None,
    min_fields: int = SOURCE_FIELDS,
) -> dict:
    """Fit how boxed fields are decided, on fields of writers the model never trained on
    (`boxed_field_records`): the confidence exponents, one for grey scans and one for bitonal ones
    (fields that break a rule are flagged whatever their confidence and are left out of the fit;
    a kind of scan with no fields gets the other's exponent); then the review threshold, the lowest
    that lets at most `risk` (default REVIEW_RISK) of all the fields out wrong (`risk_threshold`).

    sources: (N,) the population of writers of each field. Each source with `min_fields` of a kind
    of scan gets its own exponent and the largest is taken: the least sure the known populations
    call for, so that none of them is over-confident. The writers the product meets are none of
    them, and most are further from MNIST's than the pooled fit assumes (stop 43: fitted pooled,
    held-out CVL and NSYSU writers' fields at 0.90-0.95 were right 86% of the time). Without
    sources, or where none has enough fields, one exponent is fitted to them all.

    Returns {'field_power', 'field_power_bitonal', 'review_threshold', 'fields' (that break no
    rule), 'bitonal_fields', 'right', 'boxed_fields' (all), 'flagged', 'wrong_not_flagged',
    'source_powers' ({source: [grey, bitonal]}, the exponents each source alone gets, or None)}."""
    from formreader.reading.classify import REVIEW_RISK

    fit = ~ruled
    per_source: dict[str, list] = {}

    def power(kind: bool) -> float:
        chosen = fit & (bitonal == kind)
        own = []
        for source in [] if sources is None else np.unique(sources[chosen]).tolist():
            one = chosen & (sources == source)
            if one.sum() >= min_fields:
                own.append(fit_power(confidence[one], right[one]))
                per_source.setdefault(source, [None, None])[int(kind)] = round(own[-1], 4)
        return max(own) if own else fit_power(confidence[chosen], right[chosen])

    fitted = {k: power(k) for k in set(bitonal[fit].tolist())}
    grey = fitted.get(False, fitted.get(True, 1.0))
    bit = fitted.get(True, grey)
    calibrated = confidence ** np.where(bitonal, bit, grey)
    return {
        "field_power": grey,
        "field_power_bitonal": bit,
        "source_powers": per_source or None,
        "fields": int(fit.sum()),
        "bitonal_fields": int((fit & bitonal).sum()),
        "right": float(right[fit].mean()),
        "boxed_fields": len(right),
        **risk_decision(calibrated, right, ruled, REVIEW_RISK if risk is None else risk),
    }


def risk_decision(confidence: np.ndarray, right: np.ndarray, ruled: np.ndarray, risk: float) -> dict:
    """The review threshold for at most `risk` of the fields out wrong (`risk_threshold`) and what
    it does to them: {'review_threshold', 'flagged' (share of all), 'wrong_not_flagged' (count),
    'review_thresholds' ({risk: threshold} for each of classify.REVIEW_RISKS, risks as text: a
    model card's JSON keys)}. confidence (N,) calibrated, right (N,) bool, ruled (N,) bool (flagged
    by a rule whatever their confidence)."""
    threshold = risk_threshold(confidence, right, ruled, risk)
    passed = ~ruled & (confidence >= threshold)
    return {
        "review_threshold": threshold,
        "flagged": float(1 - passed.mean()),
        "wrong_not_flagged": int((passed & ~right).sum()),
        "review_thresholds": risk_table(confidence, right, ruled),
    }


def risk_table(confidence: np.ndarray, right: np.ndarray, ruled: np.ndarray) -> dict[str, float]:
    """{risk: risk_threshold} for each of classify.REVIEW_RISKS, risks as text (a model card's
    JSON keys); arguments as risk_decision's."""
    from formreader.reading.classify import REVIEW_RISKS

    return {f"{r:g}": risk_threshold(confidence, right, ruled, r) for r in REVIEW_RISKS}


def risk_threshold(confidence: np.ndarray, right: np.ndarray, flagged: np.ndarray, risk: float) -> float:
    """The lowest review threshold that lets at most `risk` of all N fields through wrong:
    confidence (N,) calibrated, right (N,) bool, flagged (N,) bool (sent to review whatever their
    confidence), rounded up to 3 decimals."""
    allowed = int(np.floor(risk * len(right)))
    order = np.argsort(-confidence[~flagged], kind="stable")  # fields let through, surest first
    candidates, wrong = confidence[~flagged][order], np.cumsum(~right[~flagged][order])
    # Letting the k surest through lets wrong[k - 1] wrong ones out; the threshold must stop above
    # the first field that would make it too many (ties at one confidence go together).
    over = np.flatnonzero(wrong > allowed)
    if over.size == 0:
        return 0.0
    stop = candidates[over[0]]
    return float(min(1.0, np.ceil((stop + 1e-9) * 1000) / 1000))


# ---------------------------------------------------------------------------------------------
# Free fields read by both readers
# ---------------------------------------------------------------------------------------------


def read_free_fields(classifier: DigitClassifier, crops: list[np.ndarray], specs: list, cut_weight: float | None = None) -> list:
    """Read grey free-field crops with both readers, each held to its template field's rules
    (`specs`, formreader.reading.template.Field), in two batches, each reading chosen with the
    cut reader's weight `cut_weight` (default: the string model card's; TwoReadings.chosen):
    [formreader.reading.string_model.TwoReadings]."""
    from formreader.reading.string_model import field_views, read_twice
    from formreader.reading.strings import field_image, segment_string

    crops = [field_image(c)[0] for c in crops]  # as read_number and the pipeline read them
    layouts = [segment_string(c) for c in crops]
    images = [layout.images for layout in layouts]
    probs = classifier.for_strings.probabilities(np.concatenate(images)) if sum(map(len, images)) else np.zeros((0, 11))
    per_field = np.split(probs, np.cumsum([len(i) for i in images])[:-1])
    steps = classifier.string_model.view_probabilities(np.stack([field_views(c) for c in crops]))
    weight = classifier.string_model.cut_weight if cut_weight is None else cut_weight
    return [read_twice(layout, p, q, spec, weight) for layout, p, q, spec in zip(layouts, per_field, steps, specs)]


def _source_weights(groups: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) weights summing to 1 by which every source (`groups`) weighs alike."""
    groups = np.zeros(n, int) if groups is None else np.asarray(groups)
    _, index, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[index]
    return weight / weight.sum()


CUT_WEIGHTS = np.round(np.arange(0.0, 1.0001, 0.05), 2)  # the cut reader's weights tried


def fit_cut_weight(readings: list, truths: list[str], groups: np.ndarray | None = None) -> float:
    """The cut reader's weight in choosing a free field's reading (TwoReadings.chosen): of
    CUT_WEIGHTS, the one under which the true digits are likeliest among each field's
    candidates (their scores normalised over the field, each source weighing alike). Fields
    whose truth neither reader proposes say nothing of the weight and are left out.
    `readings` must be read with the largest weight tried (read_free_fields' cut_weight), so
    that each holds the cut reader's support of every candidate any weight could choose."""
    keep = [i for i, (r, t) in enumerate(zip(readings, truths)) if t in r.candidates]
    weight = _source_weights(None if groups is None else np.asarray(groups)[keep], len(keep))
    truth = [list(readings[i].candidates).index(truths[i]) for i in keep]

    def loss(w: float) -> float:
        scores = [readings[i].scores(w) for i in keep]
        return float(sum(a * (np.logaddexp.reduce(z) - z[t]) for a, z, t in zip(weight, scores, truth)))

    return float(min(CUT_WEIGHTS, key=loss))


def fit_two_readers(readings: list, truths: list[str], groups: np.ndarray | None = None, l2: float = 0.01) -> list[float]:
    """Logistic regression of 'the string model read the digits right' on the readings'
    features (formreader.reading.string_model.TwoReadings): weights then bias. `groups` (N,): the
    source of each sample; every source weighs alike (a few hundred real checks are not
    outvoted by more generated ones)."""
    from scipy.optimize import minimize

    x = np.array([r.features() for r in readings], np.float64)
    y = np.array([r.value == t for r, t in zip(readings, truths)], np.float64)
    x1 = np.hstack([x, np.ones((len(x), 1))])
    weight = _source_weights(groups, len(readings))

    def loss(w):
        z = x1 @ w
        nll = np.sum(weight * (np.logaddexp(0, z) - y * z))
        return nll + l2 * np.sum(w[:-1] ** 2)

    w0 = np.zeros(x1.shape[1])
    w0[0] = 1.0
    return [float(v) for v in minimize(loss, w0, method="L-BFGS-B").x]


def fit_free_threshold(
    readings: list,
    crops: list[np.ndarray],
    specs: list,
    truths: list[str],
    calibration: list[float],
    risk: float,
    documents: np.ndarray | None = None,
) -> dict:
    """Free fields' review threshold, chosen as boxed fields' is (`risk_threshold`): the lowest that
    lets at most `risk` of the validation fields out wrong, each decided as a form's free field is
    (its readings `readings`, TwoReadings chosen; their confidence by the field `calibration`; the
    field's rules). Returns risk_decision's {'review_threshold', 'flagged', 'wrong_not_flagged',
    'review_thresholds'}, and with `documents` (N,) (each field's kind of paper, 'check' or 'form')
    'review_thresholds_by_document' (thresholds_by_document)."""
    from formreader.reading.fields import read_free_field
    from formreader.reading.string_model import combine_readings

    decided = [
        read_free_field(spec, combine_readings(r, np.shape(crop), calibration), threshold=0.0)
        for r, crop, spec in zip(readings, crops, specs)
    ]
    right = np.array([f.value == t for f, t in zip(decided, truths)])
    confidence = np.array([f.confidence for f in decided])
    ruled = np.array([bool(f.reasons) for f in decided])  # threshold 0: only rules give reasons
    decision = risk_decision(confidence, right, ruled, risk)
    if documents is not None:
        decision["review_thresholds_by_document"] = thresholds_by_document(confidence, right, ruled, documents)
    return decision


# A threshold chosen to let k validation fields out wrong rests on where those few fall: with one or
# two, a model that moves one field moves the threshold (stop 46 calibrated on more fields for this).
MIN_WRONG_LET_OUT = 3


def thresholds_by_document(confidence: np.ndarray, right: np.ndarray, ruled: np.ndarray, documents: np.ndarray) -> dict:
    """{kind: {risk: threshold}} for each kind of paper in `documents` (N,) ('check', 'form'), each
    chosen on that kind's fields alone, as risk_decision chooses (confidence, right, ruled: (N,)),
    for a template of that `document`: a risk holds for fields like those it was chosen on. Where a
    risk lets fewer than MIN_WRONG_LET_OUT of a kind's fields out wrong, its threshold would rest on
    one or two fields: there it is the stricter of the kind's and all fields'."""
    documents = np.asarray(documents)
    pooled = risk_table(confidence, right, ruled)
    chosen = {}
    for kind in sorted(set(documents)):
        of = documents == kind
        own = risk_table(confidence[of], right[of], ruled[of])
        chosen[str(kind)] = {
            r: t if np.floor(float(r) * of.sum()) >= MIN_WRONG_LET_OUT else max(t, pooled[r]) for r, t in own.items()
        }
    return chosen


# What two_reader_calibration_fields' `sources` 0-3 are, in its order, and the kind of paper
# (a template's `document`) each is.
CALIBRATION_FIELD_SOURCES = ("ORAND's val checks", "generated checks", "free-field forms, MNIST", "free-field forms, CVL")
CALIBRATION_FIELD_DOCUMENTS = ("check", "check", "form", "form")


def two_reader_calibration_fields(
    classifier: DigitClassifier,
    checks: int,
    seed: int,
    data_dir: Path | None = None,
    forms: int = CALIBRATION_FREE_FORMS,
    struck: bool = False,
):
    """Validation free fields: ORAND's validation checks (their amounts), `checks` scanned generated
    checks written with the digit model's MNIST validation digits, and `forms` free-field forms
    (thick worn borders, bitonal; 6 fields each) written by its MNIST and by its CVL validation
    writers. Returns (crops, specs, truths, sources): sources 0 for ORAND, 1 the checks, 2 and 3
    the forms. struck: the same forms with a digit of one field a page struck through, that
    field's truth None (synth.scanned_free_forms)."""
    from formreader.pipeline import free_field_window, scale_to_template
    from formreader.reading.register import RegistrationError, prepare_reference, register_page
    from formreader.reading.template import Field
    from formreader.training.datasets import load_cvl, load_orand
    from formreader.training.synth import ink_on_black, make_checks, scan, scanned_free_forms
    from formreader.training.train import TrainConfig, mnist_split

    root = Path(data_dir) if data_dir else None
    amount = Field("amount", kind="free", box=(0, 0, 1, 1), separators=".,")
    crops, specs, truths = [], [], []
    for a in load_orand("val", root / "orand_car_a" if root else None):
        crops.append(a.image)
        specs.append(amount)
        truths.append(a.value)
    real = len(crops)
    config = TrainConfig.from_card(classifier.meta.get("config", {}))
    images, labels = load_mnist("train", root / "mnist" if root else None, False)
    val, _ = mnist_split(len(images), config, np.random.default_rng(config.seed))
    blank, fields, filled = make_checks(checks, seed, images[val], labels[val])
    features = prepare_reference(blank)
    rng = np.random.default_rng(seed)
    for page, values in filled:
        try:
            aligned = register_page(scan(page, rng, max_rotation=5), blank, features).aligned
        except RegistrationError:
            continue
        for spec in fields:
            crops.append(free_field_window(aligned, spec.box)[0])  # as the pipeline reads it
            specs.append(spec)
            truths.append("".join(c for c in values[spec.name] if c.isdigit()))
    sources = [0] * real + [1] * (len(crops) - real)
    # Free fields on thick-bordered bitonal forms, by the MNIST and the CVL writers held out
    # for the digit model's validation.
    writers = classifier.meta.get("held_out", {}).get("cvl_validation_writers", [])
    populations = [(images[val], labels[val])]
    if writers:
        x, y, w = load_cvl("train", root / "cvl_digits" / "cvl_train.npz" if root else None)
        populations.append(ink_on_black(x[np.isin(w, writers)], y[np.isin(w, writers)]))
    for k, (digit_images, digit_labels) in enumerate(populations):
        template, items = scanned_free_forms(digit_images, digit_labels, forms, seed + 1 + k, struck)
        reference = prepare_reference(template.reference)
        for page, truth in items:
            try:
                reg = register_page(scale_to_template(page.image, page.dpi, template), template.reference, reference)
            except RegistrationError:
                continue
            for spec in template.fields:
                crops.append(free_field_window(reg.aligned, spec.box)[0])
                specs.append(spec)
                truths.append(truth[spec.name])
                sources.append(2 + k)
    return crops, specs, truths, np.array(sources)
