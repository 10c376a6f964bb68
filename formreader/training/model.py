"""The digit classifier's architecture, and the original student model it replaces.

Classes 0-9 are the digits; class 10 is "not a digit" (specks, blobs, pieces of box line,
scribbles), so that such ink is rejected instead of read as a confident digit.
"""

from __future__ import annotations

import keras
from keras import layers

from formreader.reading.classify import NOT_A_DIGIT, NUM_CLASSES  # noqa: F401  (one definition)


def _conv_bn_relu(x, filters: int, kernel: int = 3, padding: str = "same"):
    x = layers.Conv2D(filters, kernel, padding=padding, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def build_digit_cnn(dropout: float = 0.3, width: float = 1.0, depth: int = 1) -> keras.Model:
    """formreader's digit CNN: 28x28x1 (ink 1.0 on 0.0) -> 11 logits; about 0.13M parameters at
    width 1 (channels 16-32-64-128, each times `width`).

    Pooling early keeps the arithmetic small (about 4M multiply-adds per digit against the
    original's 13M); the last conv sees the whole digit at 5x5, and the flattened map keeps
    where strokes are, which a global pooling would throw away.

    depth 2: two 3x3 convolutions at 28x28 and at 14x14 instead of one 5x5 and one 3x3, and the
    last two 64 wide (times `width`): channels 16-16-32-32-64-64, 0.32M parameters at width 2.
    A network that sees the strokes differently, to average with the first (`companion`).
    """
    if depth not in (1, 2):
        raise ValueError(f"depth must be 1 or 2, got {depth}")
    inputs = keras.Input((28, 28, 1), name="digit")
    c = lambda n: int(round(n * width))  # noqa: E731
    if depth == 1:
        x = _conv_bn_relu(inputs, c(16), 5)
    else:
        x = _conv_bn_relu(_conv_bn_relu(inputs, c(16)), c(16))
    x = layers.MaxPooling2D()(x)  # 14x14
    x = _conv_bn_relu(x, c(32))
    if depth == 2:
        x = _conv_bn_relu(x, c(32))
    x = layers.MaxPooling2D()(x)  # 7x7
    x = _conv_bn_relu(x, c(64))
    x = _conv_bn_relu(x, c(128 if depth == 1 else 64), padding="valid")  # 5x5
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


def build_string_crnn(width: float = 1.0, dropout: float = 0.2) -> keras.Model:
    """The string model: a free field (32x256x1, ink 1.0 on 0.0; formreader.reading.string_model.field_input)
    -> 64 steps x 15 logits (CTC blank, then 0-9 . , - /).

    Four conv blocks (channels 32-64-96-128 times `width`) pool the height away and the width
    by 4, so each step sees a column 4 px wide and, through the receptive field, about a digit
    around it; a convolutional head (kernel 5, then dilated) lets a step see its neighbours, so
    a loop in a chain of zeros is read in context. Convolutions only: fast on the CPU and in
    LiteRT, where recurrent layers are not.
    """
    c = lambda n: int(round(n * width))  # noqa: E731
    inputs = keras.Input((32, 256, 1), name="field")
    x = _conv_bn_relu(inputs, c(32))
    x = layers.MaxPooling2D()(x)  # 16x128
    x = _conv_bn_relu(x, c(64))
    x = layers.MaxPooling2D()(x)  # 8x64
    x = _conv_bn_relu(x, c(96))
    x = _conv_bn_relu(x, c(96))
    x = layers.MaxPooling2D((2, 1))(x)  # 4x64
    x = _conv_bn_relu(x, c(128))
    x = layers.MaxPooling2D((4, 1))(x)  # 1x64
    x = layers.Reshape((64, c(128)))(x)
    x = layers.Dropout(dropout)(x)
    for dilation in (1, 2):
        y = layers.Conv1D(c(128), 5, padding="same", dilation_rate=dilation, use_bias=False)(x)
        y = layers.BatchNormalization()(y)
        x = layers.Add()([x, layers.ReLU()(y)])
    logits = layers.Dense(15, name="logits")(x)
    return keras.Model(inputs, logits, name="formreader_string_crnn")
