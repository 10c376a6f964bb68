"""Classify: 28x28 digit images -> calibrated class probabilities.

The model is a Keras file (loaded in Keras' safe mode: no code from the file is run) with a JSON
card beside it holding the temperature fitted on held-out data. Inference goes through one fast
path, used by the pipeline, the API and the benchmarks alike: the model converted by
TensorFlow's own TFLite converter and run by the LiteRT interpreter (XNNPACK kernels), whole
batches at a time. The converted file is cached beside the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from formreader.reading.string_model import StringModel

NUM_CLASSES = 11
NOT_A_DIGIT = 10  # the class for ink that is not a digit

# The shipped models: the repository's models/ folder, which an installed wheel carries as
# formreader/models (pyproject.toml maps one onto the other).
_REPOSITORY_MODELS = Path(__file__).resolve().parents[2] / "models"
MODELS = _REPOSITORY_MODELS if (_REPOSITORY_MODELS / "digits.keras").exists() else Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = MODELS / "digits.keras"
STRING_MODEL_SUFFIX = ".strings.keras"  # models/digits.strings.keras: digits.keras tuned on string pieces
COMPANION_SUFFIX = ".companion.keras"  # models/digits.companion.keras: a second network, averaged for boxed cells
STRUCK_SUFFIX = ".struck.keras"  # models/digits.struck.keras: tells a digit struck through (StrikeDetector)
STRING_READER_NAME = "strings.keras"  # the string model, beside the digit model
LABELS = "0123456789"
# The review threshold of a model whose card holds none (LiteRTModel.review_threshold: one not
# calibrated by `formreader calibrate` or `calibrate-strings`); every free field's until stop 37.
DEFAULT_REVIEW_THRESHOLD = 0.85
# The share of fields a review threshold may let out wrong on the validation fields it is chosen
# on (`formreader calibrate`, `calibrate-strings`): the aim for writers never seen.
REVIEW_RISK = 0.003
# The risks a card also holds a review threshold for (`review_thresholds`), so that a template may
# accept another (its `review_risk`: issue #9 accepts 1% of check amounts wrong but `ok`).
REVIEW_RISKS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05)
# Free-field forms per population of writers that free fields are calibrated on: with 18 (stops
# 36-45) the 622 validation fields let a 0.3% risk rest on the one field let out wrong, and a
# new model or reading moved the threshold by where its second-surest wrong field fell; with 60,
# 1,126 fields, three (docs/measurements.md, stop 46).
CALIBRATION_FREE_FORMS = 60
# Forms of each source of validation writers and style that `formreader calibrate` fits boxed
# fields' confidence and threshold on: 80 (4,320 fields; 40 until stop 57, on which the 0.3%
# threshold rested on 6 fields let out wrong, and let 0.83% out on other pages of the same writers).
CALIBRATION_PAGES = 80


class ModelError(RuntimeError):
    """A model file that is missing or cannot be used; the message names the file."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def load_keras_model(path: Path):
    """Load a .keras model in safe mode, with a clear ModelError if it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path} (train one with `formreader train`)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as e:  # Keras raises many types for damaged archives
        raise ModelError(f"model file {path} cannot be loaded (damaged or not a Keras model): {e}") from e


# How the fast path's models are converted. Their weights are stored as int8 and each layer's
# input is quantised as it runs (TFLite's dynamic-range quantisation): about 3x the float
# model's speed on a CPU, per-source accuracy within 0.1 points (models/MODEL_CARD.md). It
# needs no calibration data, so a converted model is made again from its .keras file alone.
TFLITE_RECIPE = "dynamic-range: int8 weights, float32 in and out"


def convert_to_tflite(model, quantize: bool = True) -> bytes:
    """Convert a Keras model to a TFLite flatbuffer with TensorFlow's converter: by TFLITE_RECIPE,
    or plain float32 with `quantize=False`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


@contextlib.contextmanager
def _native_stderr_silenced():
    """Silence what native code writes to the process's stderr (LiteRT's "INFO: Created
    TensorFlow Lite XNNPACK delegate" line, which `-q` must not print), for a moment."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _interpreter(content: bytes, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older set-ups: TensorFlow's own copy of the interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with _native_stderr_silenced():
        interpreter = Interpreter(model_content=content, num_threads=threads)
        interpreter.allocate_tensors()  # the delegate is applied (and announces itself) here
    return interpreter


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def convert_when_trained(path: Path, meta: dict, log=print) -> None:
    """Make a just-trained model's fast path (cached_tflite) where this process can: TensorFlow's
    converter takes a model built on its own Keras backend, and fails on one trained on JAX (as
    on a lent accelerator, which has no TensorFlow). Such a model is converted at its first load,
    by a process on TensorFlow's backend."""
    import keras

    if keras.backend.backend() != "tensorflow":
        log(f"trained on Keras' {keras.backend.backend()} backend: the .tflite fast path is made at the model's first load")
        return
    cached_tflite(path, meta)


def cached_tflite(path: Path, meta: dict) -> bytes:
    """The converted model beside `path` (.tflite), made again if it is not from this .keras file
    by this TFLITE_RECIPE.

    The card records the SHA-256 of the .keras file the .tflite was converted from and of the
    .tflite itself; file times are not trusted (a git checkout sets them all alike).
    """
    cache = path.with_suffix(".tflite")
    source = file_sha256(path)
    if cache.exists() and meta.get("tflite_source_sha256") == source and meta.get("tflite_recipe") == TFLITE_RECIPE:
        content = cache.read_bytes()
        # The cache's own digest too: a cache damaged on disk (or swapped) is made again, not run.
        if hashlib.sha256(content).hexdigest() == meta.get("tflite_sha256"):
            return content
    try:
        content = convert_to_tflite(load_keras_model(path))
    except ImportError as e:
        raise ModelError(
            f"{cache} is missing, damaged or not converted from {path.name}, and converting it again needs "
            f"TensorFlow: pip install 'formreader[train]' ({e})"
        ) from e
    try:
        tmp = cache.with_suffix(".tflite.tmp")
        tmp.write_bytes(content)
        tmp.replace(cache)
        card = path.with_suffix(".json")
        meta["tflite_source_sha256"] = source
        meta["tflite_recipe"] = TFLITE_RECIPE
        meta["tflite_sha256"] = hashlib.sha256(content).hexdigest()
        card.write_text(json.dumps(meta, indent=2) + "\n")
    except OSError:
        pass  # a read-only install still works, converting at each start
    return content


def run_interpreter(runners: threading.local, content: bytes, threads: int, x: np.ndarray) -> np.ndarray:
    """Run a model on one batch with this thread's own interpreter (`runners` holds one per
    thread: a LiteRT interpreter must never be shared between threads, or answers mix)."""
    it = getattr(runners, "interpreter", None)
    if it is None:
        it = runners.interpreter = _interpreter(content, threads)
        runners.batch = -1
    index = it.get_input_details()[0]["index"]
    if runners.batch != len(x):
        it.resize_tensor_input(index, x.shape)
        it.allocate_tensors()
        runners.batch = len(x)
    it.set_tensor(index, x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


@dataclass
class LiteRTModel:
    """A model on the fast path: its converted form (run by LiteRT, one interpreter per
    thread), the temperature calibrating its softmax, and its card."""

    tflite: bytes
    temperature: float
    meta: dict
    path: str = ""
    threads: int = 0

    @classmethod
    def from_card(cls, path: Path, missing: str, threads: int | None = None):
        """The model of a .keras file, run from its converted form with the card beside it, on
        `threads` threads an interpreter (default: the cores, up to 4); ModelError with `missing`
        when there is no such file."""
        card = path.with_suffix(".json")
        if not path.exists():
            raise ModelError(missing)
        try:
            meta = json.loads(card.read_text())
            temperature = float(meta["temperature"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"model card {card} is missing or has no 'temperature': {e}") from e
        return cls(cached_tflite(path, meta), temperature, meta, str(path), threads or min(4, os.cpu_count() or 1))

    def __post_init__(self):
        self._runners = threading.local()

    def __getstate__(self):  # picklable for process pools: the interpreters are rebuilt there
        return {k: v for k, v in self.__dict__.items() if k != "_runners"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._runners = threading.local()

    @property
    def fingerprint(self) -> str:
        """What decides this model's readings, as 16 hex digits: its network and its card's
        calibration (temperature, field powers and review threshold, field calibration, the cut
        reader's weight; a struck-digit detector's thresholds). A journal written with other weights or another calibration is not
        resumed with this model."""
        keys = (
            "field_power", "field_power_bitonal", "field_calibration", "cut_weight", "review_threshold", "companion_gate",
            "pair_temperature", "review_thresholds", "struck_threshold", "struck_free_threshold",
        )
        decisive = [hashlib.sha256(self.tflite).hexdigest(), self.temperature, *(self.meta.get(k) for k in keys)]
        return hashlib.sha256(json.dumps(decisive).encode()).hexdigest()[:16]

    @property
    def review_threshold(self) -> float:
        """The confidence under which a field this model decides goes to review unless a threshold
        is given: chosen on fields of writers the model never trained on, as the lowest that lets
        no more than the card's `review_risk` (REVIEW_RISK) of them out wrong; the digit model's
        for boxed fields (`formreader calibrate`), the string model's for free ones (`formreader
        calibrate-strings`). DEFAULT_REVIEW_THRESHOLD for a model not calibrated so."""
        return float(self.meta.get("review_threshold", DEFAULT_REVIEW_THRESHOLD))

    def review_threshold_at(self, risk: float | None = None, document: str | None = None) -> float:
        """The review threshold for at most `risk` of the fields out wrong but `ok` (a template's
        `review_risk`); None: the card's own (`review_threshold`). Of the card's thresholds for
        REVIEW_RISKS, the one for the largest risk not above `risk`: never less strict than asked.
        `document` (a template's: 'form', 'check'): the thresholds chosen on validation fields of
        that kind of paper where the card holds them (`review_thresholds_by_document`, the string
        model's), else those chosen on all. ModelError when the card holds none that strict
        (calibrated before it had them, or a risk under the least it was chosen for)."""
        chosen = self.meta.get("review_thresholds_by_document", {}).get(document or "", {})
        by_document = {float(r): float(t) for r, t in chosen.items()}
        if risk is None:  # the card's own risk, on that kind of paper where the card holds a threshold for it
            own = float(self.meta.get("review_risk", REVIEW_RISK))
            if not any(r <= own + 1e-12 for r in by_document):
                return self.review_threshold
            risk = own
        if by_document:
            table = by_document
        else:
            table = {float(r): float(t) for r, t in self.meta.get("review_thresholds", {}).items()}
            if "review_risk" in self.meta and "review_threshold" in self.meta:
                table.setdefault(float(self.meta["review_risk"]), float(self.meta["review_threshold"]))
        within = [r for r in table if r <= risk + 1e-12]
        if not within:
            fitted = ", ".join(f"{r:g}" for r in sorted(table)) or "none"
            raise ModelError(
                f"{self.path}: no review threshold for a risk of {risk:g} (its card has them for: {fitted}); calibrate "
                f"it for that risk: `formreader calibrate --risk {risk:g}` (boxed fields) or `calibrate-strings` (free ones)"
            )
        return table[max(within)]

    def run(self, x: np.ndarray) -> np.ndarray:
        """The raw outputs for one batch, on this thread's interpreter."""
        return run_interpreter(self._runners, self.tflite, self.threads, x)


@dataclass
class DigitClassifier(LiteRTModel):
    """Calibrated digit classifier over the fast inference path.

    Construct with `DigitClassifier.load(path)`. Call `probabilities(images)` with images
    (N, 28, 28) float32, ink 1.0 on 0.0; get (N, 11) calibrated probabilities (digits 0-9, then
    not-a-digit).
    """
    # The same network fine-tuned on the pieces string segmentation cuts (models/digits.strings.keras),
    # which refuses wrong cuts; it reads free-written numbers, this one reads boxed cells.
    strings: DigitClassifier | None = None
    # A second network trained on the same writers, built otherwise (models/digits.companion.keras):
    # boxed cells are read by both and their calibrated probabilities averaged (`cell_probabilities`).
    companion: DigitClassifier | None = None
    # The string model (CNN + CTC, models/strings.keras beside this one) that reads a free field
    # whole; free fields are read by both it and the cut pieces (formreader.reading.string_model).
    string_model: StringModel | None = None
    # The detector of digits struck through (models/digits.struck.keras): a boxed cell, or a digit
    # of a free field on a form, it holds struck sends its field to review.
    struck: StrikeDetector | None = None

    @classmethod
    def load(cls, path: Path | None = None, threads: int | None = None, calibrating: bool = False) -> DigitClassifier:
        """The digit model at `path` (default: the shipped one) with the models beside it;
        `calibrating`: the string model's field calibration is about to be fitted anew
        (StringModel.load)."""
        path = Path(path) if path else DEFAULT_MODEL
        clf = cls.from_card(path, f"model file not found: {path} (train one with `formreader train`)", threads)
        clf._check()
        if path.name.endswith((STRING_MODEL_SUFFIX, COMPANION_SUFFIX)):
            return clf  # a model beside the digit model: the others there are the digit model's
        if path.with_suffix(STRUCK_SUFFIX).exists():
            clf.struck = StrikeDetector.load(path.with_suffix(STRUCK_SUFFIX), threads)
        if path.with_suffix(COMPANION_SUFFIX).exists():
            clf.companion = cls.load(path.with_suffix(COMPANION_SUFFIX), threads)
        companion = path.with_suffix(STRING_MODEL_SUFFIX)
        if companion.exists():
            clf.strings = cls.load(companion, threads)
            reader = path.with_name(STRING_READER_NAME)
            if reader.exists():
                from formreader.reading.string_model import StringModel

                clf.string_model = StringModel.load(reader, threads, calibrating)
        return clf

    def field_power(self, bitonal: bool = False) -> float:
        """The exponent calibrating a boxed field's confidence (formreader.reading.fields.read_field),
        fitted apart for grey and for bitonal scans (`formreader calibrate`): on a bitonal scan
        strokes break and thicken, and the same cell probabilities are right less often."""
        grey = float(self.meta.get("field_power", 1.0))
        return float(self.meta.get("field_power_bitonal", grey)) if bitonal else grey

    @property
    def for_strings(self) -> DigitClassifier:
        """The classifier for free-written numbers' pieces: the string model beside this one, if any."""
        return self.strings or self

    def pair_mean(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, 11) of digit images (N, 28, 28): this network's averaged with its
        companion's, when there is one, for the images this network puts under the card's
        `companion_gate` (all without one); this network's alone for the others. Before the
        pair's own temperature (cell_probabilities)."""
        p = self.probabilities(images)
        if self.companion is None:
            return p
        # An image this network is sure of is not read again (card: companion_gate): on the held-out
        # writers the pair read alike at 0.98 and above (model card), and the companion costs
        # 1.7x this network's arithmetic, which is most of a page on a CPU without int8 dot products.
        gate = self.meta.get("companion_gate")
        asked = np.ones(len(p), bool) if gate is None else p.max(axis=1) < float(gate)
        if asked.any():
            p[asked] = (p[asked] + self.companion.probabilities(images[asked])) / 2
        return p

    def cell_probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, 11) of digit images (N, 28, 28) as boxed cells and
        read_digits read them: by this network and its companion (pair_mean). Two networks
        trained apart err on different digits, and their mean is less sure where they disagree,
        most of all on writers neither saw; but it is less sure where they agree too, so the mean
        is calibrated again by the card's `pair_temperature` (fitted on the model's validation
        digits by `formreader calibrate`: fit_pair_temperature)."""
        temperature = self.meta.get("pair_temperature") if self.companion is not None else None
        return self.pair_mean(images) if temperature is None else softmax(self.pair_logits(images), float(temperature))

    def pair_logits(self, images: np.ndarray) -> np.ndarray:
        """(N, 11) log of pair_mean: what the pair's temperature divides (cell_probabilities)."""
        return np.log(np.maximum(self.pair_mean(images), 1e-12))

    def _check(self) -> None:
        try:
            out = self.logits(np.zeros((1, 28, 28), np.float32))
        except Exception as e:
            raise ModelError(f"model {self.path} cannot run: {e}") from e
        if out.shape != (1, 11):
            raise ModelError(f"model {self.path} gives {out.shape[1]} outputs; formreader needs 11 (0-9, not-a-digit)")

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits (N, 11) for images (N, 28, 28) float32 in [0, 1]."""
        x = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, 28, 28, 1)
        if len(x) == 0:
            return np.zeros((0, 11), np.float32)
        return self.run(x)

    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Calibrated probabilities (N, 11): softmax of logits / temperature. Read `batch_size`
        at a time: the same figures at any batch, and a small batch keeps its activations in the
        cores' caches (read_digits 10-14% faster at 64 than at 256 on stop 36's CPU, and 2-4%
        faster again at 32 with one-thread interpreters on stop 38's)."""
        parts = [self.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        logits = np.concatenate(parts) if parts else np.zeros((0, 11), np.float32)
        return softmax(logits, self.temperature)


@dataclass
class StrikeDetector(LiteRTModel):
    """Tells a written digit struck through (voided by its writer) from one written plainly, by
    its ink as its box frames it, or in a free field as a box would (strings.digit_views). Construct
    with `StrikeDetector.load(path)`; call `probabilities(views)` with views (N, BOX_VIEW, BOX_VIEW)
    float32 (segment.box_view); a score at or over `threshold` (a boxed cell) or `free_threshold`
    (a free field's digit), its card's, chosen on validation writers' fields, is a strike."""

    @classmethod
    def load(cls, path: Path, threads: int | None = None) -> StrikeDetector:
        detector = cls.from_card(path, f"model file not found: {path} (train one with `formreader train-struck`)", threads)
        if "struck_threshold" not in detector.meta:
            raise ModelError(f"model card {path.with_suffix('.json')} has no 'struck_threshold'")
        return detector

    @property
    def threshold(self) -> float:
        return float(self.meta["struck_threshold"])

    @property
    def free_threshold(self) -> float | None:
        """None for a detector taught boxed cells alone: free fields' digits are not looked at."""
        value = self.meta.get("struck_free_threshold")
        return None if value is None else float(value)

    def probabilities(self, views: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N,) the chance that each view's digit was struck through."""
        x = np.asarray(views, np.float32)[..., None]
        if not len(x):
            return np.zeros(0, np.float32)
        return np.concatenate([self.run(x[i : i + batch_size])[:, 0] for i in range(0, len(x), batch_size)])


# The models a model holds (DigitClassifier's, StringModel's companion): each runs on its own interpreters.
HELD_MODELS = ("strings", "companion", "string_model", "struck")


def single_threaded(model: LiteRTModel | None) -> LiteRTModel | None:
    """A copy of a model, and of the models it holds, whose interpreters use one thread each: for
    threads (or processes) that run as many at once as there are cores, where an interpreter of
    several threads stalls whenever another of them takes one of its cores."""
    if model is None:
        return None
    held = {k: single_threaded(getattr(model, k)) for k in HELD_MODELS if hasattr(model, k)}
    return replace(model, threads=1, **held)


@dataclass
class DigitReading:
    """One cell's reading: the digit ('' when blank, '?' when the ink is not a digit)."""

    digit: str
    confidence: float  # calibrated probability that `digit` is right
    probabilities: np.ndarray | None = None  # (11,) or None for a blank cell


def label_of(k: int) -> str:
    """A class as a reading writes it: the digit, or '?' for not-a-digit."""
    return "?" if k == NOT_A_DIGIT else LABELS[k]


def reading_from_probabilities(p: np.ndarray) -> DigitReading:
    """The reading for one cell's probabilities (11,): the most probable class."""
    k = int(np.argmax(p))
    return DigitReading(label_of(k), float(p[k]), p)
