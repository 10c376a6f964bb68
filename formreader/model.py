"""The digit classifier's architecture, and the original student model it replaces.

Classes 0-9 are the digits; class 10 is "not a digit" (specks, blobs, pieces of box line,
scribbles), so that such ink is rejected instead of read as a confident digit.
"""

from __future__ import annotations

import keras
from keras import layers

from formreader.classify import NOT_A_DIGIT, NUM_CLASSES  # noqa: F401  (one definition)


def _conv_bn_relu(x, filters: int, kernel: int = 3, padding: str = "same"):
    x = layers.Conv2D(filters, kernel, padding=padding, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def build_digit_cnn(dropout: float = 0.3, width: float = 1.0) -> keras.Model:
    """formreader's digit CNN: 28x28x1 (ink 1.0 on 0.0) -> 11 logits; about 0.13M parameters at
    width 1 (channels 16-32-64-128, each times `width`).

    Pooling early keeps the arithmetic small (about 4M multiply-adds per digit against the
    original's 13M); the last conv sees the whole digit at 5x5, and the flattened map keeps
    where strokes are, which a global pooling would throw away.
    """
    inputs = keras.Input((28, 28, 1), name="digit")
    c = lambda n: int(round(n * width))  # noqa: E731
    x = _conv_bn_relu(inputs, c(16), 5)
    x = layers.MaxPooling2D()(x)  # 14x14
    x = _conv_bn_relu(x, c(32))
    x = layers.MaxPooling2D()(x)  # 7x7
    x = _conv_bn_relu(x, c(64))
    x = _conv_bn_relu(x, c(128), padding="valid")  # 5x5
    x = layers.Flatten()(x)
    x = layers.Dropout(dropout)(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="formreader_digit_cnn")


def build_original_cnn() -> keras.Model:
    """The student project's model (2.38M parameters), kept to benchmark against."""
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="original_student_cnn")
