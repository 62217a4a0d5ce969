"""Inputs for validation, calibration and latency: a dataset (.npz), tokenized sentences for
text models, or synthetic tensors drawn from the input signature.

Samples are kept as batches (dicts name -> array, the first axis the batch) so the reference
model and the candidates see exactly the same tensors. numpy only; the tokenizer, when there
is one, comes from the source.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ptm_runtime.convert.errors import InvalidSource, InvalidSpec
from ptm_runtime.options import TensorDType, TensorSpec

Batch = dict[str, np.ndarray]

NUMPY_DTYPES: dict[TensorDType, type[np.generic]] = {
    TensorDType.FLOAT32: np.float32,
    TensorDType.FLOAT16: np.float16,
    TensorDType.INT64: np.int64,
    TensorDType.INT32: np.int32,
    TensorDType.INT8: np.int8,
    TensorDType.UINT8: np.uint8,
    TensorDType.BOOL: np.bool_,
}
#: Length used for a dynamic non-batch dimension of a synthetic input (e.g. a sequence).
SYNTHETIC_DIM = 16

#: Real sentences for text models (validation and calibration); varied in length and topic so
#: that padding, rare tokens and long contexts are all exercised.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes operators reconcile the desired state of custom resources.",
    "I would like a large pizza with extra cheese and mushrooms, please.",
    "Quantization trades a little accuracy for a smaller, faster model.",
    "What is the capital of France?",
    "The stock market fell sharply on Monday after the central bank raised rates.",
    "She has played the violin in the city orchestra for twenty years.",
    "Deep neural networks need large amounts of labelled training data.",
    "Paris is known for the Eiffel Tower, museums and cafes along the Seine.",
    "My flight was delayed by three hours because of a storm.",
    "The patient reported mild headaches and trouble sleeping.",
    "Rainforests are home to more than half of the world's plant and animal species.",
    "Can you recommend a good book about the history of mathematics?",
    "The new smartphone has a brighter screen and a longer battery life.",
    "He forgot his umbrella and got soaked walking home.",
    "Solar panels convert sunlight directly into electricity.",
    "The committee will meet next Tuesday to review the budget proposal.",
    "A cat sat on the warm windowsill watching the birds outside.",
    "GPUs accelerate matrix multiplication, the core of most neural networks.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Our team won the championship after a dramatic penalty shootout.",
    "The museum's new exhibition features paintings from the Renaissance.",
    "Please restart the server and check whether the error persists.",
    "Climate change is causing glaciers to retreat around the world.",
    "Where can I find the nearest train station?",
    "The children built a sandcastle on the beach before the tide came in.",
    "Interest rates influence how much it costs to borrow money.",
    "The telescope captured stunning images of a distant galaxy.",
    "This restaurant serves the best noodles I have ever eaten.",
    "Regular exercise improves both physical and mental health.",
    "The software update fixed several security vulnerabilities.",
    "An old lighthouse still guides ships safely along the rocky coast.",
)


def numpy_dtype(dtype: TensorDType) -> type[np.generic]:
    return NUMPY_DTYPES[dtype]


def batch_size_of(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])


def rows(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def synthetic(inputs: list[TensorSpec], samples: int, batch: int, seed: int = 0) -> list[Batch]:
    """Random inputs from the signature: standard normal floats, integers in {0, 1}
    (valid as indices into any embedding), random booleans. Dynamic non-batch dims get
    SYNTHETIC_DIM; the batch axis (first) gets `batch`."""
    if not inputs:
        raise InvalidSpec(
            "cannot build validation inputs: the input signature is unknown (set source.inputs)"
        )
    rng = np.random.default_rng(seed)
    out: list[Batch] = []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        feeds: Batch = {}
        for spec in inputs:
            shape = [
                n if i == 0 and d == -1 else (SYNTHETIC_DIM if d == -1 else d)
                for i, d in enumerate(spec.shape)
            ]
            if spec.shape and spec.shape[0] != -1:
                shape[0] = spec.shape[0]
            dtype = numpy_dtype(spec.dtype)
            if np.issubdtype(dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype is np.bool_:
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
            else:
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        out.append(feeds)
    return out


def text(
    tokenizer: Any, input_names: list[str], samples: int, batch: int, max_length: int = 128
) -> list[Batch]:
    """Tokenized sample sentences, padded per batch."""
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(samples)]
    # past one round, pair sentences so that later samples differ from the first ones
    for i in range(len(SENTENCES), samples):
        sentences[i] = f"{sentences[i]} {SENTENCES[(i * 7 + 3) % len(SENTENCES)]}"
    out: list[Batch] = []
    limit = min(int(getattr(tokenizer, "model_max_length", max_length) or max_length), max_length)
    for start in range(0, samples, batch):
        enc = tokenizer(
            sentences[start : start + batch],
            padding=True,
            truncation=True,
            max_length=limit,
            return_tensors="np",
        )
        missing = [n for n in input_names if n not in enc]
        if missing:
            raise InvalidSource(f"the tokenizer does not produce the model inputs {missing}")
        out.append({n: np.asarray(enc[n]).astype(np.int64) for n in input_names})
    return out


def from_npz(path: Path, inputs: list[TensorSpec], samples: int, batch: int, what: str) -> list[Batch]:
    """Batches from a .npz holding one array per input name (first axis: samples)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidSource(f"{what}: {path.name} is not a readable .npz file: {exc}") from exc
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidSource(
            f"{what}: {path.name} lacks arrays for inputs {missing} (it has {sorted(arrays)})"
        )
    counts = {arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(counts) != 1 or 0 in counts:
        raise InvalidSource(f"{what}: arrays in {path.name} disagree on the number of samples or are scalars")
    total = min(counts.pop(), samples)
    out: list[Batch] = []
    for start in range(0, total, batch):
        feeds: Batch = {}
        for spec in inputs:
            arr = arrays[spec.name][start : min(start + batch, total)]
            want = spec.shape
            if want and len(want) != arr.ndim:
                raise InvalidSource(
                    f"{what}: array {spec.name} has rank {arr.ndim}, the input expects shape {want}"
                )
            bad = [
                (i, a)
                for i, (a, w) in enumerate(zip(arr.shape, want, strict=False))
                if i > 0 and w != -1 and a != w
            ]
            if bad:
                raise InvalidSource(
                    f"{what}: array {spec.name} has shape {list(arr.shape)[1:]} per sample, "
                    f"the input expects {want[1:]}"
                )
            feeds[spec.name] = arr.astype(numpy_dtype(spec.dtype))
        out.append(feeds)
    return out


def iterate_rows(batches: list[Batch]) -> Iterator[Batch]:
    """One-sample batches (calibration readers want them)."""
    for b in batches:
        for i in range(batch_size_of(b)):
            yield rows(b, i, i + 1)


def tile(batch: Batch, size: int) -> Batch:
    """A batch of exactly `size` rows made by repeating `batch`'s rows."""
    n = batch_size_of(batch)
    reps = -(-size // n)
    return {k: np.concatenate([v] * reps, axis=0)[:size] for k, v in batch.items()}
