"""The string model: a whole free-written field -> its characters, with no cuts (CNN + CTC).

Cutting ink into digits fails where people write fast: a chain of zeros is one loop after
another, neighbours touch and link. The string model reads the field's image whole: a CNN turns
it into a sequence of column features (one step per 4 px of the normalised field), a small
convolutional head gives each step a probability over the alphabet and a CTC blank, and the
reading is the most probable character sequence over all the ways of placing it (CTC), found by
a prefix beam search that can be held to the field's `pattern`.

`field_input` is the one place a grey crop becomes the model's input (training uses it too);
`field_views` gives a field as the few views of it that are read.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from formreader.reading.classify import COMPANION_SUFFIX, MODELS, NUM_CLASSES, DigitReading, LiteRTModel, ModelError, softmax
from formreader.reading.fields import STRAY_INK_CONFIDENCE, keeps_check, reading_pattern
from formreader.reading.strings import StringLayout, StringReading, cut_support, decide_string
from formreader.reading.template import Field

ALPHABET = "0123456789.,-/"  # class k + 1 is ALPHABET[k]; class 0 is the CTC blank
BLANK = 0
NUM_STRING_CLASSES = len(ALPHABET) + 1
INPUT_HEIGHT, INPUT_WIDTH = 32, 256
STEP = 4  # input columns per output step
DEFAULT_STRING_MODEL = MODELS / "strings.keras"


def field_input(crop: np.ndarray) -> np.ndarray:
    """A grey crop of a free field (H, W) uint8, dark ink on light paper -> (32, 256) float32,
    ink high (1.0) on 0.

    Ink is measured against the paper (the 90th percentile of brightness) and scaled by the
    darkest ink, so pen and pencil, white and tinted paper look alike. The field is scaled to
    32 px high keeping its proportions, and to 256 px wide at most (a longer one is squeezed),
    then padded on the right.
    """
    crop = np.asarray(crop)
    if crop.ndim != 2 or min(crop.shape) < 2:
        raise ValueError(f"a field crop must be a 2-D grey image of at least 2x2 pixels, got shape {crop.shape}")
    grey = crop.astype(np.float32)
    paper = float(np.percentile(grey, 90))
    ink_level = float(np.percentile(grey, 0.5))
    ink = np.clip((paper - grey) / max(paper - ink_level, 40.0), 0.0, 1.0)
    h, w = ink.shape
    width = max(1, min(INPUT_WIDTH, round(w * INPUT_HEIGHT / h)))
    scaled = cv2.resize(ink, (width, INPUT_HEIGHT), interpolation=cv2.INTER_AREA if h > INPUT_HEIGHT else cv2.INTER_LINEAR)
    out = np.zeros((INPUT_HEIGHT, INPUT_WIDTH), np.float32)
    out[:, :width] = scaled
    return out


# The views of a field the model reads, as (widening, shear): the crop as it is, 15% wider, and
# slanted either way. A reading found in every view is surer than one view's; a field one view
# misreads, the others often read right. Chosen on validation fields made as `formreader
# calibrate-strings` makes them: fields read right, ORAND validation checks 79.2% -> 80.2%, generated checks
# 83.2% -> 86.0%, free-field forms of MNIST and CVL validation writers 92.7% -> 92.7% and
# 75.3% -> 77.3%. (Narrower views and wider margins helped the real checks and hurt the rest.)
VIEWS = ((1.0, 0.0), (1.15, 0.0), (1.0, 0.15), (1.0, -0.15))


def field_views(crop: np.ndarray) -> np.ndarray:
    """A grey free-field crop (H, W) uint8 -> the model's inputs for each of VIEWS, (V, 32, 256)
    float32 (`field_input` of the crop widened and slanted; the first view is the crop itself)."""
    crop = np.asarray(crop)
    views = [field_input(crop)]  # VIEWS[0], the crop itself; refuses what is not a grey crop
    h, w = crop.shape
    paper = float(np.percentile(crop, 90))
    for widen, shear in VIEWS[1:]:
        extra = round(abs(shear) * h)  # a slanted field is wider by this, so none of it is cut off
        m = np.float32([[widen, shear, extra / 2 - shear * h / 2], [0, 1, 0]])
        size = (round(w * widen) + extra, h)
        views.append(field_input(cv2.warpAffine(crop, m, size, flags=cv2.INTER_LINEAR, borderValue=paper)))
    return np.stack(views)


def text_to_labels(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in text]


@dataclass
class CharacterSpan:
    """One character of a reading and where the model placed it: output steps [first, last],
    and its probability (the best step's)."""

    char: str
    first: int
    last: int
    probability: float
    peak: int = 0  # the step where it is most probable


@dataclass
class StringDecoding:
    """The model's reading of one field: `text` (digits and separators), its probability (the
    sum over all the ways CTC may place it), and each character's span."""

    text: str
    probability: float
    spans: list[CharacterSpan] = field(default_factory=list)
    steps: np.ndarray | None = None  # (T, 15) the step probabilities it was decoded from


def greedy_spans(probs: np.ndarray) -> list[CharacterSpan]:
    """The best path's characters and the steps each holds: probs (T, C) -> spans."""
    best = probs.argmax(1)
    spans: list[CharacterSpan] = []
    previous = BLANK
    for t, k in enumerate(best):
        if k != BLANK and k == previous and spans:
            spans[-1].last = t
            if probs[t, k] > spans[-1].probability:
                spans[-1].probability, spans[-1].peak = float(probs[t, k]), t
        elif k != BLANK:
            spans.append(CharacterSpan(ALPHABET[k - 1], t, t, float(probs[t, k]), t))
        previous = k
    return spans


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def beam_search(probs: np.ndarray, beam: int = 16, pattern: str = "", prune: float = 1e-4) -> list[tuple[str, float]]:
    """CTC prefix beam search: probs (T, C) per step (class 0 the blank) -> [(text, probability)],
    most probable first.

    With a `pattern` (a regular expression for the whole text) only prefixes that can still
    become a match are kept, and only full matches are returned: a date is read as one of the
    strings a date may be. Characters under `prune` at a step are not tried there.
    """
    import regex  # partial matching of a prefix against the pattern

    compiled = regex.compile(pattern) if pattern else None

    def viable(prefix: str) -> bool:
        return compiled is None or compiled.fullmatch(prefix, partial=True) is not None

    logp = np.log(np.maximum(probs, 1e-30))
    tried = probs >= prune
    tried[:, BLANK] = False
    blank_logp = logp[:, BLANK].tolist()  # Python floats: the loop below does scalar arithmetic
    # Most steps try no character: a run of them ends every prefix in a blank, in the same order,
    # and is one step whose blank is the run's (most of a field's 64 steps).
    # prefix -> (log P ending in blank, log P ending in its last character)
    beams: dict[str, tuple[float, float]] = {"": (0.0, -math.inf)}
    t = 0
    while t < len(probs):
        candidates = np.flatnonzero(tried[t]).tolist()
        if not candidates:
            end = t + 1
            while end < len(probs) and not tried[end].any():
                end += 1
            run = float(logp[t:end, BLANK].sum(dtype=np.float64))
            beams = {prefix: (_logsumexp(pb, pc) + run, -math.inf) for prefix, (pb, pc) in beams.items()}
            t = end
            continue
        nxt: dict[str, tuple[float, float]] = {}
        step = [(ALPHABET[k - 1], float(logp[t, k])) for k in candidates]

        def add(prefix: str, blank: float, char: float, nxt: dict = nxt) -> None:
            b, c = nxt.get(prefix, (-math.inf, -math.inf))
            nxt[prefix] = (_logsumexp(b, blank), _logsumexp(c, char))

        for prefix, (pb, pc) in beams.items():
            total = _logsumexp(pb, pc)
            add(prefix, total + blank_logp[t], -math.inf)
            last = prefix[-1] if prefix else None
            for ch, lp in step:
                if ch == last:
                    add(prefix, -math.inf, pc + lp)  # the same character held
                    extended = pb + lp  # a repeat needs a blank between
                else:
                    extended = total + lp
                if extended > -math.inf and viable(prefix + ch):
                    add(prefix + ch, -math.inf, extended)
        beams = dict(sorted(nxt.items(), key=lambda kv: -_logsumexp(*kv[1]))[:beam])
        t += 1
    readings = [(p, math.exp(_logsumexp(*v))) for p, v in beams.items()]
    if compiled is not None:
        readings = [r for r in readings if compiled.fullmatch(r[0])]
    return sorted(readings, key=lambda r: -r[1])


def _readings(probs: np.ndarray, pattern: str, beam: int) -> list[tuple[str, float]]:
    """The beam's readings held to the pattern; if nothing the beam kept can match it, the
    unconstrained ones."""
    readings = beam_search(probs, beam, pattern)
    return readings if readings or not pattern else beam_search(probs, beam)


def decode(probs: np.ndarray, pattern: str = "", beam: int = 16) -> StringDecoding:
    """One field's reading from its step probabilities (T, C): the beam's best (held to the
    pattern when there is one and some reading matches it), with the spans of the best path."""
    readings = _readings(probs, pattern, beam)
    return _decoding(probs, *(readings[0] if readings else ("", 0.0)))


def _decoding(probs: np.ndarray, text: str, probability: float) -> StringDecoding:
    """A reading with its characters placed on the steps `probs` (T, C): the best path's spans
    when it reads `text`, else the best alignment of `text`."""
    spans = greedy_spans(probs)
    if "".join(s.char for s in spans) != text:
        spans = _align_spans(probs, text)
    return StringDecoding(text, probability, spans, probs)


def view_readings(steps: np.ndarray, pattern: str = "", beam: int = 16) -> dict[str, tuple[str, float]]:
    """Every reading the views' beams keep, by its digits: digits -> (the text as the view that
    found it likeliest wrote it, its probability averaged over the views; a view whose beam did
    not keep it counts 0). steps: (V, T, C), the step probabilities of each of a field's views."""
    readings: dict[str, tuple[str, float]] = {}
    best: dict[str, float] = {}
    for probs in steps:
        for text, p in _readings(probs, pattern, beam):
            digits = digits_of(text)
            written, total = readings.get(digits, (text, 0.0))
            if p > best.get(digits, -1.0):
                written, best[digits] = text, p
            readings[digits] = (written, total + p / len(steps))
    return readings


def decode_views(steps: np.ndarray, pattern: str = "", beam: int = 16) -> StringDecoding:
    """One field's reading from the step probabilities of each of its views (V, T, C)
    (`field_views`): the digits with the highest probability averaged over the views
    (`view_readings`); the characters' spans are placed on the first view, the crop as it is."""
    steps = np.asarray(steps)
    if steps.ndim == 2:
        return decode(steps, pattern, beam)
    readings = view_readings(steps, pattern, beam)
    if not readings:
        return _decoding(steps[0], "", 0.0)
    text, probability = max(readings.values(), key=lambda r: r[1])
    return _decoding(steps[0], text, probability)


def ctc_probability(probs: np.ndarray, text: str) -> float:
    """The probability of `text` under CTC: the sum over every path of steps `probs` (T, C) that
    reads it (the forward algorithm), for a text the beam search may not have kept."""
    labels = np.array([BLANK] + [k for c in text_to_labels(text) for k in (c, BLANK)])
    logp = np.log(np.maximum(np.asarray(probs)[:, labels], 1e-30))
    # A step may move on by two (over a blank) only between different characters.
    skip = np.zeros(len(labels), bool)
    skip[2:] = (labels[2:] != BLANK) & (labels[2:] != labels[:-2])
    alpha = np.full(len(labels), -np.inf)
    alpha[: min(2, len(labels))] = logp[0, : min(2, len(labels))]
    for t in range(1, len(logp)):
        moved = alpha.copy()
        moved[1:] = np.logaddexp(moved[1:], alpha[:-1])
        moved[2:] = np.where(skip[2:], np.logaddexp(moved[2:], alpha[:-2]), moved[2:])
        alpha = moved + logp[t]
    return float(np.exp(np.logaddexp.reduce(alpha[-2:])))


def _align_spans(probs: np.ndarray, text: str) -> list[CharacterSpan]:
    """Where each character of `text` lies: the best CTC alignment of it (Viterbi)."""
    if not text:
        return []
    labels = [BLANK]
    for k in text_to_labels(text):
        labels += [k, BLANK]
    T, S = len(probs), len(labels)
    logp = np.log(np.maximum(probs, 1e-30))
    score = np.full((T, S), -np.inf)
    back = np.zeros((T, S), np.int64)
    score[0, 0] = logp[0, labels[0]]
    if S > 1:
        score[0, 1] = logp[0, labels[1]]
    for t in range(1, T):
        for s in range(S):
            options = [(score[t - 1, s], s)]
            if s >= 1:
                options.append((score[t - 1, s - 1], s - 1))
            if s >= 2 and labels[s] != BLANK and labels[s] != labels[s - 2]:
                options.append((score[t - 1, s - 2], s - 2))
            best, frm = max(options)
            score[t, s] = best + logp[t, labels[s]]
            back[t, s] = frm
    s = S - 1 if S == 1 or score[-1, S - 1] >= score[-1, S - 2] else S - 2
    path = [s]
    for t in range(T - 1, 0, -1):
        s = back[t, s]
        path.append(s)
    path.reverse()
    spans: dict[int, CharacterSpan] = {}
    for t, s in enumerate(path):
        if labels[s] != BLANK:
            k = (s - 1) // 2
            span = spans.setdefault(k, CharacterSpan(text[k], t, t, 0.0, t))
            span.last = t
            if probs[t, labels[s]] > span.probability:
                span.probability, span.peak = float(probs[t, labels[s]]), t
    return [spans[k] for k in sorted(spans)]


def character_columns(spans: list[CharacterSpan], crop_shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Each character's columns [x0, x1) in the field crop: CTC places a character where its
    output spikes, a step or two wide, so each reaches halfway to its neighbours' spikes (a
    lone one, about a digit's width)."""
    h, w = crop_shape
    centres = [sum(step_columns(s, crop_shape)) / 2 for s in spans]
    half = 0.35 * h  # about half a digit's width, for the ends
    out = []
    for i, c in enumerate(centres):
        left = (centres[i - 1] + c) / 2 if i else c - half
        right = (c + centres[i + 1]) / 2 if i + 1 < len(centres) else c + half
        out.append((max(0, int(left)), min(w, max(int(left) + 1, int(math.ceil(right))))))
    return out


def step_columns(span: CharacterSpan, crop_shape: tuple[int, int]) -> tuple[int, int]:
    """The column range [x0, x1) of a field crop of `crop_shape` (H, W) that a span covers."""
    h, w = crop_shape
    scale = min(INPUT_HEIGHT / h, INPUT_WIDTH / w)  # field_input's scale
    return int(span.first * STEP / scale), min(w, int(math.ceil((span.last + 1) * STEP / scale)))


@dataclass
class StringModel(LiteRTModel):
    """The string model over the fast inference path (LiteRT), as DigitClassifier is.

    `probabilities(inputs)`: inputs (N, 32, 256) float32 from field_input -> (N, 64, 15)
    calibrated per-step probabilities (softmax of logits / temperature).
    """

    # A second network of the same architecture, trained on from this one's weights on the same
    # fields for longer (models/strings.companion.keras): every field's views are read by both,
    # each network's steps calibrated by its own temperature, and a reading's probability is its
    # mean over all of them (`view_readings`). Chosen on validation fields (docs/measurements.md,
    # stop 47): either network alone flags more of them for as many let out wrong.
    companion: StringModel | None = None

    @classmethod
    def load(cls, path: Path | str | None = None, threads: int | None = None, calibrating: bool = False) -> StringModel:
        """The string model at `path`, its card and its companion beside it (if there is one).
        ModelError when it cannot be used, or when its field calibration weighs other inputs than
        TwoReadings.features (fitted by another version of formreader), unless `calibrating`
        (`formreader calibrate-strings` fits it anew)."""
        path = Path(path) if path else DEFAULT_STRING_MODEL
        missing = f"string model not found: {path} (train one with `formreader train-strings`)"
        model = cls.from_card(path, missing, threads)
        # The companion's own card is read for its temperature only: the field calibration that
        # decides is the pair's, on this card, so a calibration left on the companion's is not checked.
        if not path.name.endswith(COMPANION_SUFFIX) and path.with_suffix(COMPANION_SUFFIX).exists():
            model.companion = cls.load(path.with_suffix(COMPANION_SUFFIX), threads, calibrating=True)
        out = model.logits(np.zeros((1, INPUT_HEIGHT, INPUT_WIDTH), np.float32))
        if out.shape[1:] != (INPUT_WIDTH // STEP, NUM_STRING_CLASSES):
            raise ModelError(
                f"string model {path} gives outputs {out.shape[1:]}, formreader needs "
                f"({INPUT_WIDTH // STEP}, {NUM_STRING_CLASSES})"
            )
        fitted = model.calibration
        if fitted and len(fitted) != len(FEATURES) + 1 and not calibrating:
            raise ModelError(
                f"the field calibration in {path.with_suffix('.json')} weighs {len(fitted) - 1} inputs, this formreader "
                f"weighs {len(FEATURES)} ({', '.join(FEATURES)}): run `formreader calibrate-strings` to fit it again"
            )
        return model

    @property
    def calibration(self) -> list[float] | None:
        """The two readers' field calibration (TwoReadings.confidence), if one was fitted."""
        return self.meta.get("field_calibration")

    @property
    def cut_weight(self) -> float:
        """How much the cut reader's support weighs in choosing a free field's reading
        (TwoReadings.chosen), as fitted by `formreader calibrate-strings`; 0 if never fitted."""
        return float(self.meta.get("cut_weight", 0.0))

    def decide(
        self, layout: StringLayout, pieces: np.ndarray, steps: np.ndarray, spec: Field, crop_shape: tuple[int, int]
    ) -> StringReading:
        """A free field's reading by both readers (read_twice, combine_readings), by this model's
        card: steps (V, 64, 15) of the crop's views, the cut reader's layout and pieces (M, 11)."""
        return combine_readings(read_twice(layout, pieces, steps, spec, self.cut_weight), crop_shape, self.calibration)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Raw logits (N, 64, 15) for inputs (N, 32, 256) float32 from field_input."""
        return self.run(np.ascontiguousarray(inputs, dtype=np.float32).reshape(-1, INPUT_HEIGHT, INPUT_WIDTH, 1))

    def probabilities(self, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros((0, INPUT_WIDTH // STEP, NUM_STRING_CLASSES), np.float32)
        parts = [self.logits(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        return softmax(np.concatenate(parts), self.temperature)

    def view_probabilities(self, views: np.ndarray) -> np.ndarray:
        """Step probabilities for fields' views (F, V, 32, 256) from field_views, all read in one
        batch: (F, V, 64, 15), or with a companion (F, 2V, 64, 15), this network's views first."""
        steps = self.probabilities(views.reshape(-1, INPUT_HEIGHT, INPUT_WIDTH))
        steps = steps.reshape(*views.shape[:2], *steps.shape[1:])
        if self.companion is None:
            return steps
        return np.concatenate([steps, self.companion.view_probabilities(views)], axis=1)

    @property
    def fingerprint(self) -> str:
        """LiteRTModel.fingerprint, the companion's network and temperature included."""
        own = super().fingerprint
        return own if self.companion is None else hashlib.sha256(f"{own}:{self.companion.fingerprint}".encode()).hexdigest()[:16]


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def digits_of(text: str) -> str:
    """The digits of a reading, its separators left out: what a field's value is."""
    return "".join(c for c in text if c.isdigit())


# A reading the cut reader cannot make at all counts as this unlikely by it (cut_support's
# floor): the string model alone may still carry it, if it is that much surer.
SUPPORT_FLOOR = 1e-6


def _askable(probability: np.ndarray, cut_weight: float) -> np.ndarray:
    """Which readings (their string-model probabilities, (K,)) the cut reader's support could
    still make the choice: those within SUPPORT_FLOOR ** cut_weight of the likeliest. For the
    others it is neither asked (read_twice) nor used (TwoReadings.scores)."""
    probability = np.maximum(np.asarray(probability, np.float64), 1e-30)
    return probability >= probability.max() * SUPPORT_FLOOR**cut_weight


# What a free field's calibrated confidence weighs, in TwoReadings.features' order.
FEATURES = ("share of the candidates", "string model's probability", "cut reader's confidence", "agreement", "support")


@dataclass
class TwoReadings:
    """One free field read by both readers: cut-and-classify's reading (strings.decide_string),
    the reading chosen for the field (`whole`, decoded on the string model's steps), how far the
    cut reader supports its digits (strings.cut_support), and its share of what the two readers
    together find likely among all the candidates (`share`, TwoReadings.chosen).

    `candidates`: every reading either reader proposes, by its digits -> (text as written, the
    string model's probability of it over the views, the cut reader's support of it, or None
    where it was not asked: a reading too unlikely by the string model to be chosen, `scores`)."""

    cut: StringReading
    whole: StringDecoding
    support: float
    candidates: dict[str, tuple[str, float, float | None]] = field(default_factory=dict)
    share: float = 1.0

    @property
    def value(self) -> str:
        return digits_of(self.whole.text)

    def scores(self, cut_weight: float) -> np.ndarray:
        """Each candidate's log-score (in `candidates`' order) with the cut reader weighed by
        `cut_weight`: the string model's log-probability plus `cut_weight` times the log of the
        cut reader's support. A reading more than SUPPORT_FLOOR ** cut_weight less likely by the
        string model than the likeliest cannot be chosen whatever its support; its support is
        neither asked (read_twice) nor used: it counts as SUPPORT_FLOOR."""
        probability = np.array([max(p, 1e-30) for _, p, _ in self.candidates.values()])
        asked = _askable(probability, cut_weight)
        support = [s if a and s is not None else SUPPORT_FLOOR for (_, _, s), a in zip(self.candidates.values(), asked)]
        return np.log(probability) + cut_weight * np.log(np.maximum(np.array(support, np.float64), SUPPORT_FLOOR))

    def chosen(self, cut_weight: float) -> TwoReadings:
        """The same field with the reading the two readers together find likeliest (`scores`: a
        product of the two experts, the cut reader's vote weighed by a power fitted on validation
        fields by `formreader calibrate-strings`; 0: the string model's reading alone), and its
        share of all the candidates' scores."""
        if not self.candidates:
            return self
        score = self.scores(cut_weight)
        best = int(np.argmax(score))
        text, probability, support = list(self.candidates.values())[best]
        share = float(np.exp(score[best] - np.logaddexp.reduce(score)))
        return TwoReadings(self.cut, _decoding(self.whole.steps, text, probability), support, self.candidates, share)

    def features(self) -> list[float]:
        """What the field calibration weighs: the reading's share of the candidates and both
        readers' probabilities (as logits), whether they read the same digits, and the support
        (as a log10 from -6 to 0)."""
        agree = self.value == self.cut.value and not self.cut.unreadable
        cut = self.cut.confidence if self.cut.raw else 0.5
        support = max(-6.0, math.log10(max(self.support, 1e-12)))
        return [_logit(self.share), _logit(self.whole.probability), _logit(cut), float(agree), support]  # FEATURES

    def confidence(self, calibration: list[float] | None) -> float:
        """P(the chosen reading is right): a logistic fit over `features` (`calibration`: their
        weights, then a bias; fitted on validation fields by `formreader calibrate-strings`).
        Without one, the string model's own probability."""
        if not calibration:
            return self.whole.probability
        z = float(np.dot(calibration[:-1], self.features()) + calibration[-1])
        return 1.0 / (1.0 + math.exp(-z))


def read_twice(layout: StringLayout, pieces: np.ndarray, steps: np.ndarray, spec: Field, cut_weight: float = 0.0) -> TwoReadings:
    """Read a free field with both readers, each held to the field's rules, and choose between
    their readings (TwoReadings.chosen).

    layout, pieces: the field's string segmentation and its pieces' probabilities (M, 11);
    steps: the string model's step probabilities for the same crop's views (V, 64, 15)
    (`field_views`), or for the crop alone (64, 15).
    """
    steps = np.asarray(steps)
    steps = steps[None] if steps.ndim == 2 else steps
    pattern = reading_pattern(spec)
    cut = decide_string(layout, pieces, spec.separators, spec.pattern)
    readings = view_readings(steps, pattern)
    # The cut reader's own reading, where the string model's beams did not keep it (a mark it
    # took for a separator before the first digit or after the last left out).
    written = cut.raw.strip(".,-/")
    if written and not cut.unreadable and cut.value not in readings and re.fullmatch(pattern, written):
        readings[cut.value] = (written, float(np.mean([ctc_probability(p, written) for p in steps])))
    # A view whose beam kept nothing the field's rules allow offers what it read unconstrained;
    # where another reading keeps to the rules (its pattern, its check digit), that one is the field's.
    allowed = {d: r for d, r in readings.items() if re.fullmatch(pattern, r[0]) and keeps_check(spec.check, d)}
    readings = allowed or readings
    if not readings:
        return TwoReadings(cut, _decoding(steps[0], "", 0.0), 0.0)
    # The cut reader's support is asked only where it could make the choice (each costs a
    # search over its cuts).
    asked = _askable([p for _, p in readings.values()], cut_weight)
    candidates = {
        digits: (text, p, cut_support(layout, pieces, digits) if a else None)
        for (digits, (text, p)), a in zip(readings.items(), asked)
    }
    # Nothing decoded yet: `chosen` decodes the reading it picks, on the crop's own view.
    return TwoReadings(cut, StringDecoding("", 0.0, [], steps[0]), 0.0, candidates).chosen(cut_weight)


def _digit_distribution(steps: np.ndarray | None, span: CharacterSpan) -> np.ndarray | None:
    """A span's peak step as a digit reading's (11,) probabilities: the ten digits, then all
    else (blank and separators) as 'not a digit'."""
    if steps is None:
        return None
    p = steps[span.peak]
    out = np.zeros(NUM_CLASSES, np.float32)
    out[:10] = p[1:11]
    out[10] = p[0] + p[11:].sum()
    return out


def combine_readings(both: TwoReadings, crop_shape: tuple[int, int], calibration: list[float] | None = None) -> StringReading:
    """One free field read by both readers -> the reading it gets: the string model's text, with
    a confidence from both, each digit's place as the string model put it (`boxes`, crop px),
    where the cut reader split touching ink (`cuts`), and the cut reader's own reading where it
    reads other digits (`other`, shown to whoever reviews the field).

    How far the cut reader supports the string model's digits is one of the confidence's inputs
    (TwoReadings.features), not a rule of its own: on the validation fields every field that the
    cut reader found a thousandth as likely as its own reading already had a confidence under
    the review threshold, and on ORAND's held-out checks such a rule flagged 18 more fields, all
    of them right.
    """
    whole = both.whole
    h, _ = crop_shape
    digits = [DigitReading(s.char, s.probability, _digit_distribution(whole.steps, s)) for s in whole.spans if s.char.isdigit()]
    boxes = [
        (x0, 0, x1 - x0, h) for (x0, x1), s in zip(character_columns(whole.spans, crop_shape), whole.spans) if s.char.isdigit()
    ]
    other = both.cut.raw if both.cut.value != both.value else ""
    # Digits the cut reader read around marks that are no digit keep those marks ('3?'): a
    # reading never drops what it could not read, and the field goes to review for them.
    marked = both.cut.unreadable if both.cut.value == both.value else 0
    raw = both.cut.raw if marked else whole.text
    # Each such mark weighs on the confidence as a boxed cell's '?' does (STRAY_INK_CONFIDENCE):
    # the value leaves out what may be a digit, whatever the calibration makes of the rest.
    confidence = both.confidence(calibration) * STRAY_INK_CONFIDENCE**marked
    # The cut reader's cuts stay: the inspect picture shows where it split touching ink too.
    return StringReading(both.value, raw, confidence, digits, both.cut.cuts, boxes, marked, other=other)
