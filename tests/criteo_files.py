"""Small Criteo-format data sets for tests: raw Kaggle / Terabyte text, and processed files as the original wrote them.

The raw rows carry a planted signal: the label is drawn from a hidden logistic model of two categorical features
(C1 with 6 values, C2 with 5) and one integer feature (I1), strong enough that a small DLRM trained for one epoch
reaches a test ROC AUC well above 0.75. The other features are noise with a range of vocabulary sizes, integers
include negatives, categorical hashes span the whole 32-bit range, and some fields are empty (which reads as 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Vocabulary sizes of the noise features C3..C26 (capped at the rows written).
NOISE_CARDINALITIES = [2, 3, 4, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
NOISE_CARDINALITIES += [10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 10, 30, 300, 3000, 30_000]
C1_WEIGHTS = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
C2_WEIGHTS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
I1_WEIGHT = 1.0
EMPTY_FIELDS = 0.03  # chance that a feature field is empty
ROWS_PER_BLOCK = 50_000


def write_kaggle(path: Path, rows: int, seed: int = 0) -> Path:
    """Write a Kaggle-style ``train.txt`` (into ``path`` when it is a directory, else at ``path``); return it."""
    file = path / "train.txt" if path.is_dir() else path
    generator = _RowGenerator(rows, seed)
    with open(file, "w") as out:
        _write_rows(out, generator, rows)
    return file


def write_terabyte(directory: Path, days: int, rows_per_day: int, seed: int = 0) -> Path:
    """Write Terabyte-style ``day_0 .. day_{days-1}``; return the ``day`` prefix (what --raw-data-file names)."""
    generator = _RowGenerator(days * rows_per_day, seed)
    for day in range(days):
        with open(directory / f"day_{day}", "w") as out:
            _write_rows(out, generator, rows_per_day)
    return directory / "day"


def write_upstream_processed(path: Path, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a concatenated processed file as the original's preprocessing left it; return its arrays.

    Compressed, X_cat as float64 ids (the original's dtype) in Fortran order, X_int and y as int32, counts as int32.
    """
    arrays = _processed_arrays(rows, seed)
    with open(path, "wb") as out:
        np.savez_compressed(out, **{**arrays, "X_cat": _as_the_original_stored(arrays["X_cat"])})
    return arrays


def write_upstream_days(raw_file: Path, rows_per_day: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Write what the original's Kaggle preprocessing leaves beside ``raw_file`` (``<dir>/train.txt``): per-day
    ``train_day_<i>_processed.npz``, ``train_day_count.npz``, ``train_fea_count.npz``; return all rows' arrays."""
    arrays = _processed_arrays(sum(rows_per_day), seed)
    stem = raw_file.parent / raw_file.name.split(".")[0]
    starts = np.cumsum([0, *rows_per_day])
    for day, (start, stop) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        day_arrays = {name: arrays[name][start:stop] for name in ("X_cat", "X_int", "y")}
        day_arrays["X_cat"] = _as_the_original_stored(day_arrays["X_cat"])
        with open(f"{stem}_day_{day}_processed.npz", "wb") as out:
            np.savez_compressed(out, **day_arrays)
    with open(f"{stem}_day_count.npz", "wb") as out:
        np.savez_compressed(out, total_per_file=np.array(rows_per_day))
    with open(f"{stem}_fea_count.npz", "wb") as out:
        np.savez_compressed(out, counts=arrays["counts"])
    return arrays


def _as_the_original_stored(ids: np.ndarray) -> np.ndarray:
    """The original saved ``X_cat=np.transpose(X_cat_t)``, and concatenated such arrays: np.save keeps them in
    Fortran order (column after column)."""
    return np.transpose(np.ascontiguousarray(ids.T))


def _processed_arrays(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 200, size=26).astype(np.int32)
    return {
        "X_cat": np.floor(rng.random((rows, 26)) * counts).astype(np.float64),
        "X_int": rng.integers(0, 1000, size=(rows, 13)).astype(np.int32),
        "y": rng.integers(0, 2, size=rows).astype(np.int32),
        "counts": counts,
    }


class _RowGenerator:
    """Draws rows (as lists of text fields) from one hidden model, so that consecutive files share vocabularies."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        cardinalities = [len(C1_WEIGHTS), len(C2_WEIGHTS)] + [min(c, max(rows, 2)) for c in NOISE_CARDINALITIES]
        self.vocabularies = [self._hashes(cardinality) for cardinality in cardinalities]

    def _hashes(self, cardinality: int) -> np.ndarray:
        values = self.rng.choice(2**32, size=cardinality, replace=False)
        return np.array([f"{value:08x}" for value in values.tolist()])

    def columns(self, rows: int) -> list[np.ndarray]:
        """The rows' 40 columns of text: label, I1..I13, C1..C26."""
        rng = self.rng
        picks = [self._skewed_picks(len(vocabulary), rows) for vocabulary in self.vocabularies]
        i1 = rng.geometric(0.25, size=rows) - 1
        logit = -0.5 + C1_WEIGHTS[picks[0]] + C2_WEIGHTS[picks[1]] + I1_WEIGHT * (np.log1p(i1) - 1.2)
        labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
        integers = [i1, rng.integers(-3, 50, size=rows)]
        integers += [np.floor(rng.lognormal(1.5, 1.5, size=rows)).astype(int) for _ in range(11)]
        categorical = [vocabulary[pick] for vocabulary, pick in zip(self.vocabularies, picks, strict=True)]
        return [labels.astype(str)] + [self._with_empties(column) for column in integers + categorical]

    def _skewed_picks(self, cardinality: int, rows: int) -> np.ndarray:
        return np.minimum((cardinality * self.rng.random(rows) ** 2).astype(int), cardinality - 1)

    def _with_empties(self, column: np.ndarray) -> np.ndarray:
        text = column.astype(str).astype(object)
        text[self.rng.random(len(text)) < EMPTY_FIELDS] = ""
        return text


def _write_rows(out, generator: _RowGenerator, rows: int) -> None:
    for start in range(0, rows, ROWS_PER_BLOCK):
        columns = generator.columns(min(ROWS_PER_BLOCK, rows - start))
        out.writelines("\t".join(fields) + "\n" for fields in zip(*(c.tolist() for c in columns), strict=True))
