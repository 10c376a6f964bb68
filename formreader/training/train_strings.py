"""Training the string model (formreader.reading.string_model) on fields composed from real digits and
on real check amounts.

Synthetic fields: the digits of the digit model's training split (MNIST train, CVL training
writers, ORAND digits of training checks; never a held-out writer or check) written as people
write numbers: touching, overlapping and linked neighbours (chains of zeros), varied size,
spacing and slant, separators, thick or thin pens; then what paper adds: box borders, guide
lines, security patterns, stray strokes, blur, noise, JPEG. Real fields: the ORAND-CAR-A
training checks, augmented. Validation: fields of the validation digits and ORAND's
validation checks. ORAND's test checks are never read here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from formreader.reading.string_model import ALPHABET, INPUT_WIDTH, STEP, field_input, text_to_labels
from formreader.training.datasets import CheckAmount, load_orand
from formreader.training.synth import DigitSource, bitonal, write_number

MAX_LABEL = 16
assert 2 * MAX_LABEL - 1 <= INPUT_WIDTH // STEP


@dataclass
class StringTrainConfig:
    epochs: int = 30
    steps: int = 200  # batches per epoch
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: float = 1.0
    real_share: float = 0.3  # of each batch: augmented ORAND training amounts
    # Which population writes a composed field's digits: MNIST's fifty thousand would otherwise
    # write nearly all of them, and checks are written by people like ORAND's and CVL's writers.
    source_weights: tuple = (("mnist", 0.3), ("cvl", 0.3), ("orand", 0.4))
    seed: int = 20261124
    initial: str | None = None  # start from this string model's weights instead of at random
    average_with: str | None = None  # then average the weights with this model's, if validation says so
    narrow: float = 0.0  # this share of composed digits is written narrow (synth.write_number)
    time_limit: float | None = None  # stop after the last epoch that fits in this many seconds


def random_text(rng: np.random.Generator) -> str:
    """A number as people write one in a free field: check amounts (round thousands and chains
    of zeros are common), amounts with cents, dates, and plain digit strings."""
    kind = rng.random()
    if kind < 0.4:  # a check amount, often round
        units = int(rng.integers(1, 10 ** int(rng.integers(1, 7))))
        zeros = int(rng.choice([0, 0, 1, 2, 3, 3, 4]))
        whole = str(units)[: max(1, len(str(units)) - zeros)] + "0" * zeros
        if len(whole) > 3 and rng.random() < 0.3:
            sep = str(rng.choice([".", ","]))
            head, rest = whole[: len(whole) % 3 or 3], whole[len(whole) % 3 or 3 :]
            whole = head + "".join(sep + rest[i : i + 3] for i in range(0, len(rest), 3))
        return whole
    if kind < 0.55:  # money with cents
        units = str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
        return units + str(rng.choice([".", ","])) + f"{int(rng.integers(0, 100)):02d}"
    if kind < 0.7:  # a date
        sep = str(rng.choice(["/", ".", "-"]))
        d, m, y = int(rng.integers(1, 32)), int(rng.integers(1, 13)), int(rng.integers(1950, 2030))
        if rng.random() < 0.5:
            return f"{d:02d}{sep}{m:02d}{sep}{y}"
        return f"{d}{sep}{m}{sep}{y % 100:02d}"
    return "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(1, 11))))


def _security_pattern(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A light guilloche-like pattern of wavy lines: (H, W) uint8 darkness to subtract."""
    h, w = shape
    layer = np.zeros((h, w), np.uint8)
    xs = np.arange(0, w, 2)
    gap, amp, period, level = rng.uniform(4, 10), rng.uniform(1, 4), rng.uniform(8, 25), int(rng.uniform(20, 80))
    for y in np.arange(-10, h + 10, gap):
        ys = y + amp * np.sin(xs / period + y / 11.0)
        cv2.polylines(layer, [np.stack([xs, ys], 1).astype(np.int32)], False, level, 1, cv2.LINE_AA)
    return layer


def compose_field(text: str, source: DigitSource, rng: np.random.Generator, narrow: float = 0.0) -> np.ndarray:
    """A grey field crop (H, W) uint8 with `text` written in it by hand, as scanned.

    Neighbours touch (and zeros chain) at a rate drawn per field; the whole is slanted, the pen
    made thicker or thinner; box borders, a guide line, a security pattern, a stray stroke,
    blur, noise, a bitonal scan or JPEG come each with some chance. Half the fields are cut tight around the
    writing, as an ORAND crop is, the rest with their box.
    """
    digits = sum(c.isdigit() for c in text)
    height = rng.uniform(24, 44)  # the box's height, px
    box_h = int(height / rng.uniform(0.55, 0.68) + 4)
    box_w = int(30 + (1.15 * digits + 0.75 * (len(text) - digits)) * height * rng.uniform(0.9, 1.4))
    pad = 12
    canvas = np.full((box_h + 2 * pad, box_w + 2 * pad), 255, np.uint8)
    paper = rng.uniform(200, 255)
    ink = rng.uniform(10, 110)
    touching = rng.uniform(0, 0.9)
    write_number(canvas, (pad, pad, box_w, box_h), text, source, rng, ink, touching=touching, broken=0.1, narrow=narrow)
    if rng.random() < 0.7:  # slant
        shear = rng.uniform(-0.35, 0.3)
        m = np.float32([[1, shear, -shear * canvas.shape[0] / 2], [0, 1, 0]])
        canvas = cv2.warpAffine(canvas, m, (canvas.shape[1], canvas.shape[0]), borderValue=255)
    pen = rng.random()
    if pen < 0.25:
        canvas = cv2.erode(canvas, np.ones((2, 2), np.uint8))  # a broader pen
    elif pen < 0.35:
        canvas = cv2.dilate(canvas, np.ones((2, 2), np.uint8))  # a finer one
    if rng.random() < 0.15:  # a stray stroke or lead-in before or after the writing
        cols = np.flatnonzero((canvas < 128).any(0))
        if cols.size:
            y = int(rng.uniform(0.3, 0.9) * canvas.shape[0])
            x = int(cols[0] - rng.uniform(3, 15)) if rng.random() < 0.5 else int(cols[-1] + rng.uniform(3, 15))
            length = int(rng.uniform(0.3, 1.0) * height)
            cv2.line(
                canvas,
                (x, y),
                (x + length * int(rng.choice([-1, 1])), y + int(rng.uniform(-0.3, 0.3) * length)),
                int(ink),
                int(rng.integers(1, 3)),
                cv2.LINE_AA,
            )
    img = canvas.astype(np.float32) * (paper / 255)
    if rng.random() < 0.35:
        img -= _security_pattern(img.shape, rng)
    if rng.random() < 0.4:  # the box's border
        t = int(rng.integers(1, 4))
        cv2.rectangle(img, (pad - t, pad - t), (pad + box_w + t, pad + box_h + t), float(rng.uniform(0, 90)), t)
    elif rng.random() < 0.2:  # a guide line to write on
        y = pad + int(box_h * rng.uniform(0.85, 1.0))
        cv2.line(img, (0, y), (img.shape[1], y), float(rng.uniform(0, 120)), int(rng.integers(1, 3)))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0))
    img += rng.normal(0, rng.uniform(0, 10), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:  # a bitonal scan: thin strokes break, edges go ragged
        img = bitonal(img, rng)
    elif rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 90))])
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if rng.random() < 0.5:  # cut tight around the writing, as ORAND's crops are
        ys, xs = np.nonzero(canvas < 160)
        if ys.size:
            m = int(rng.uniform(0, 0.25) * height)
            img = img[max(0, ys.min() - m) : ys.max() + m + 1, max(0, xs.min() - m) : xs.max() + m + 1]
    else:
        m = int(rng.integers(0, pad))
        img = img[m : img.shape[0] - m, m : img.shape[1] - m]
    return img


def without_separators(amount: CheckAmount) -> np.ndarray:
    """An ORAND crop with the small marks between its digit boxes (thousands dots and commas,
    which its labels leave out) painted over with the paper, so that the model is not taught
    that a dot is nothing: (H, W) uint8."""
    img = amount.image.copy()
    if not amount.boxes:
        return img
    paper = int(np.percentile(img, 90))
    ink = img < paper - max(40, 0.4 * (paper - int(img.min())))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    covered = np.zeros_like(ink)
    for x, y, w, h in amount.boxes:
        covered[y : y + h, x : x + w] = True
    digit_height = float(np.median([b[3] for b in amount.boxes]))
    first, last = min(b[0] for b in amount.boxes), max(b[0] + b[2] for b in amount.boxes)
    for k in range(1, count):
        x, y, w, h, _ = stats[k]
        component = labels == k
        if (covered & component).sum() > 0.2 * component.sum():
            continue
        if h < 0.45 * digit_height and w < 0.6 * digit_height and first < x + w / 2 < last:
            img[cv2.dilate(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)] = paper
    return img


def augment_real(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A real field crop, varied as scans of it could be: scale, slant, margins, pen, noise."""
    h, w = img.shape
    sx, sy = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
    shear = rng.uniform(-0.15, 0.15)
    pad = int(0.15 * h)
    m = np.float32([[sx, shear, pad], [0, sy, pad]])
    paper = float(np.percentile(img, 90))
    out = cv2.warpAffine(img, m, (int(w * sx + abs(shear) * h + 2 * pad), int(h * sy + 2 * pad)), borderValue=paper)
    top, bottom, left, right = (int(rng.uniform(0, 1) * pad) for _ in range(4))
    out = out[top : out.shape[0] - bottom, left : out.shape[1] - right]
    if rng.random() < 0.2:
        out = cv2.erode(out, np.ones((2, 2), np.uint8))
    out = out.astype(np.float32) + rng.normal(0, rng.uniform(0, 6), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def encode_labels(texts: list[str]) -> np.ndarray:
    """(N, MAX_LABEL) int32 class indices, 0 (the blank) after the end."""
    out = np.zeros((len(texts), MAX_LABEL), np.int32)
    for i, t in enumerate(texts):
        labels = text_to_labels(t)[:MAX_LABEL]
        out[i, : len(labels)] = labels
    return out


def fits(text: str) -> bool:
    """Whether a text can be a training label: at most MAX_LABEL characters (CTC's need of a
    step per character and one between repeats, 2 * 16 - 1, is then within the 64 steps)."""
    return len(text) <= MAX_LABEL


def ctc_loss(y_true, y_pred):
    """Keras CTC loss over padded labels (0 after the end) and all 64 steps."""
    import keras

    labels = keras.ops.cast(y_true, "int32")
    label_length = keras.ops.sum(keras.ops.cast(labels > 0, "int32"), axis=1)
    steps = keras.ops.full((keras.ops.shape(y_pred)[0],), keras.ops.shape(y_pred)[1], dtype="int32")
    return keras.ops.ctc_loss(labels, y_pred, label_length, steps, mask_index=0)


class MixedSource:
    """Digits drawn from several populations (formreader.training.synth.DigitSource each) by weight: a
    field is written by one population (`new_writer`), as one person writes a check."""

    def __init__(self, digits: np.ndarray, labels: np.ndarray, sources: np.ndarray, weights: dict, rng: np.random.Generator):
        from formreader.training.train import SOURCES

        self.rng = rng
        self.parts, shares = [], []
        for name, weight in weights.items():
            keep = sources == SOURCES.index(name)
            if keep.any() and weight > 0:
                self.parts.append(DigitSource(digits[keep], labels[keep], rng, reuse=True))
                shares.append(weight)
        self.shares = np.array(shares) / sum(shares)
        self.current = self.parts[0]

    def new_writer(self) -> None:
        self.current = self.parts[int(self.rng.choice(len(self.parts), p=self.shares))]

    def take(self, digit: int) -> np.ndarray:
        return self.current.take(digit)


def _string_batches(
    digits: np.ndarray,
    digit_labels: np.ndarray,
    digit_sources: np.ndarray,
    real: list[np.ndarray],
    real_texts: list[str],
    config: StringTrainConfig,
):
    import keras

    class FieldBatches(keras.utils.PyDataset):
        def __init__(self):
            # Fields are composed on the CPU while the network trains: on an accelerator they are what
            # it waits for (64 fields take 0.09 s of one core), so as many threads as cores, up to 8
            # (OpenCV's calls let go of the interpreter's lock).
            super().__init__(workers=min(8, max(2, os.cpu_count() or 2)), use_multiprocessing=False)
            self.epoch = 0

        def on_epoch_end(self):
            self.epoch += 1

        def __len__(self):
            return config.steps

        def __getitem__(self, i):
            rng = np.random.default_rng([config.seed, self.epoch, i])
            source = MixedSource(digits, digit_labels, digit_sources, dict(config.source_weights), rng)
            images, texts = [], []
            for _ in range(config.batch_size):
                if real and rng.random() < config.real_share:
                    k = int(rng.integers(len(real)))
                    images.append(field_input(augment_real(real[k], rng)))
                    texts.append(real_texts[k])
                    continue
                text = random_text(rng)
                while not fits(text):
                    text = random_text(rng)
                source.new_writer()
                images.append(field_input(compose_field(text, source, rng, config.narrow)))
                texts.append(text)
            return np.stack(images)[..., None], encode_labels(texts)

    return FieldBatches()


def validation_fields(digits: np.ndarray, digit_labels: np.ndarray, amounts: list[CheckAmount], n: int, seed: int):
    """Validation inputs (N, 32, 256, 1), their texts, and which are real ORAND amounts."""
    rng = np.random.default_rng(seed)
    source = DigitSource(digits, digit_labels, rng, reuse=True)
    texts = [t for t in (random_text(rng) for _ in range(2 * n)) if fits(t)][:n]
    images = [field_input(compose_field(t, source, rng)) for t in texts]
    images += [field_input(a.image) for a in amounts]
    texts += [a.value for a in amounts]
    real = np.array([False] * n + [True] * len(amounts))
    return np.stack(images)[..., None], texts, real


def fit_string_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the CTC loss (the negative log-probability of the right
    text) on validation fields: a coarse then fine search."""
    import keras

    def loss(t: float) -> float:
        return float(np.mean(keras.ops.convert_to_numpy(ctc_loss(labels, logits / t))))

    grid = np.linspace(0.6, 3.0, 25)
    best = grid[int(np.argmin([loss(t) for t in grid]))]
    fine = np.linspace(best - 0.1, best + 0.1, 21)
    return float(fine[int(np.argmin([loss(t) for t in fine]))])


def greedy_texts(logits: np.ndarray) -> list[str]:
    out = []
    for best in logits.argmax(-1):
        chars = [ALPHABET[k - 1] for i, k in enumerate(best) if k != 0 and (i == 0 or k != best[i - 1])]
        out.append("".join(chars))
    return out


def train_string_model(
    out: Path,
    config: StringTrainConfig,
    digits: np.ndarray,
    digit_labels: np.ndarray,
    digit_sources: np.ndarray,
    val_digits: np.ndarray,
    val_labels: np.ndarray,
    data_dir: Path | None = None,
    log=print,
) -> dict:
    """Train the string model and write `out` (.keras) with its card (.json) and .tflite beside it.

    digits: (N, 28, 28) uint8 training digits, ink high (the digit model's training split);
    val_digits likewise from its validation split. ORAND's training checks are the real fields,
    its validation checks part of the validation set; its test checks are not read.
    """
    import keras

    from formreader.training.model import build_string_crnn
    from formreader.training.train import time_limit

    keras.utils.set_random_seed(config.seed)
    folder = Path(data_dir) / "orand_car_a" if data_dir else None
    train_amounts = load_orand("train", folder)
    val_amounts = load_orand("val", folder)
    real = [without_separators(a) for a in train_amounts]
    batches = _string_batches(digits, digit_labels, digit_sources, real, [a.value for a in train_amounts], config)
    vx, vtexts, vreal = validation_fields(val_digits, val_labels, val_amounts, 1000, config.seed + 1)
    vy = encode_labels(vtexts)
    log(
        f"training on fields of {len(digits)} digits and {len(real)} ORAND training amounts; "
        f"validating on {int((~vreal).sum())} composed fields and {int(vreal.sum())} ORAND validation amounts"
    )

    if config.initial:
        model = keras.saving.load_model(config.initial, compile=False, safe_mode=True)
    else:
        model = build_string_crnn(width=config.width)
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, config.epochs * config.steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=5.0), loss=ctc_loss)

    class Accuracy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            read = greedy_texts(np.asarray(self.model.predict(vx, batch_size=256, verbose=0)))
            right = np.array([r == t for r, t in zip(read, vtexts)])
            logs["val_orand"] = float(right[vreal].mean())
            logs["val_composed"] = float(right[~vreal].mean())
            log(f"epoch {epoch + 1}: fields right: ORAND validation {logs['val_orand']:.1%}, composed {logs['val_composed']:.1%}")

    best = keras.callbacks.ModelCheckpoint(
        str(Path(out).with_name(Path(out).stem + ".best.keras")), monitor="val_loss", save_best_only=True
    )
    start = time.time()
    limit = time_limit(config.time_limit, log)
    history = model.fit(batches, validation_data=(vx, vy), epochs=config.epochs, callbacks=[Accuracy(), best, *limit], verbose=2)
    seconds = time.time() - start
    model = keras.saving.load_model(best.filepath, compile=False, safe_mode=True)
    Path(best.filepath).unlink(missing_ok=True)
    record = {
        "epochs": config.epochs,
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "orand_checks": {"train": len(train_amounts), "val": len(val_amounts)},
        "training_seconds": round(seconds, 1),
        "stopped_for_time": bool(limit and limit[0].stopped),
        "config": dict(vars(config)),
    }
    if config.average_with:
        # Weights averaged with the model this run started from (a "model soup"): kept only
        # when the validation fields say it is better.
        soup = average_weights([model, keras.saving.load_model(config.average_with, compile=False, safe_mode=True)])
        if validation_loss(soup, vx, vy) < validation_loss(model, vx, vy):
            model, record["averaged_with"] = soup, config.average_with
    return save_string_model(model, Path(out), (vx, vtexts, vreal), record, log)


def average_weights(models: list):
    """One model whose weights are the mean of `models`' (all of one architecture)."""
    import keras

    soup = keras.models.clone_model(models[0])
    soup.set_weights([np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in models))])
    return soup


def validation_loss(model, vx: np.ndarray, vy: np.ndarray) -> float:
    import keras

    logits = np.asarray(model.predict(vx, batch_size=256, verbose=0))
    return float(np.mean(keras.ops.convert_to_numpy(ctc_loss(vy, logits))))


def save_string_model(model, out: Path, validation: tuple, record: dict, log=print) -> dict:
    """Fit the temperature on the validation fields, write `out` (.keras), its card (.json)
    with `record` and the validation figures, and its .tflite. Returns the card."""
    import keras

    from formreader.reading.classify import convert_when_trained

    vx, vtexts, vreal = validation
    vy = encode_labels(vtexts)
    logits = np.asarray(model.predict(vx, batch_size=256, verbose=0))
    temperature = fit_string_temperature(logits, vy)
    right = np.array([r == t for r, t in zip(greedy_texts(logits), vtexts)])
    tmp = out.with_name(out.stem + ".tmp.keras")
    model.save(tmp)
    tmp.replace(out)
    meta = {
        "temperature": temperature,
        "alphabet": ALPHABET,
        "input": "32x256 float32, ink 1.0 on 0.0 (formreader.reading.string_model.field_input)",
        "output": "64 steps x 15 (CTC blank, then the alphabet)",
        "parameters": int(model.count_params()),
        "validation_fields_right": {"orand_val": float(right[vreal].mean()), "composed": float(right[~vreal].mean())},
        **record,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Keras {keras.__version__} on {keras.backend.backend()}",
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    convert_when_trained(out, meta, log)
    log(f"saved {out}; temperature {temperature:.3f}; {meta['validation_fields_right']}")
    return meta

