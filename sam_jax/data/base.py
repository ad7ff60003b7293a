"""The one in-memory dataset type every data source returns.

A ``Dataset`` holds the examples of one split as numpy arrays on the host and
yields batches ``{"x": float32, "y": int32}`` (docs/ARCHITECTURE.md). Images are
stored raw (uint8 for TFDS images) and converted, augmented and normalized per
batch, so CIFAR-10 costs 150 MB rather than 600 MB of host memory.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from sam_jax.data import augment as aug


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset, in memory.

    Attributes:
      name: dataset name, e.g. "cifar10".
      split: split name, e.g. "train".
      x: (N, ...) stored inputs (uint8 images or float32).
      y: (N,) int32 labels (possibly noisy; see ``per_example["clean_y"]``).
      num_classes: number of classes.
      normalization: (mean, std) applied after conversion to float, or None.
      augmentation: what ``batches(augment=True)`` applies.
      per_example: extra (N, ...) arrays kept aligned with x by ``subset``,
        e.g. ``clean_y`` and ``noisy`` when label noise is on.
      info: dataset-level metadata (e.g. the signal vector of the patch data).
    """

    name: str
    split: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    normalization: tuple[Any, Any] | None = None
    augmentation: aug.Augmentation = aug.Augmentation()
    per_example: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Labels are int32 everywhere (the batch contract); cast once here.
        object.__setattr__(self, "y", np.asarray(self.y).astype(np.int32, copy=False))
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} examples but y has {self.y.shape[0]}")
        if self.y.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.y.shape}")
        for key, value in self.per_example.items():
            if value.shape[0] != self.x.shape[0]:
                raise ValueError(f"per_example[{key!r}] has {value.shape[0]} rows, expected {self.x.shape[0]}")
        if not self.augmentation.is_identity and self.x.ndim != 4:
            raise ValueError(f"image augmentation needs NHWC inputs, got shape {self.x.shape}")

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (32, 32, 3) or (40, 1)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.num_examples

    def steps_per_epoch(self, batch_size: int, drop_remainder: bool = True) -> int:
        """Number of batches ``batches`` yields with these settings."""
        _check_batch_size(batch_size)
        if drop_remainder:
            return self.num_examples // batch_size
        return -(-self.num_examples // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        augment: bool | aug.Augmentation = False,
        shuffle: bool = True,
        drop_remainder: bool = True,
        pad_remainder: bool = False,
        rows: slice | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield one epoch of batches ``{"x": float32, "y": int32}``.

        The order and the augmentation are a pure function of (seed, epoch), so a
        resumed run sees exactly the batches of the uninterrupted one.

        Args:
          batch_size: examples per batch.
          seed: run seed.
          epoch: epoch index (a different permutation per epoch).
          augment: True applies ``self.augmentation``; an ``Augmentation``
            overrides it; False applies none.
          shuffle: permute the examples (else the stored order).
          drop_remainder: drop the last incomplete batch.
          pad_remainder: with ``drop_remainder=False``, pad the last batch to
            ``batch_size`` with zero examples (fixed shapes under jit) and add a
            ``"mask"`` (float32, 1 = real) to every batch.
          rows: only these rows (``slice(start, stop)``, ``0 <= start < stop <=
            batch_size``) of every batch: each yielded batch is exactly
            ``batch[rows]`` of the batch the call without ``rows`` yields, bit for
            bit, augmentation included, but only these rows are gathered,
            augmented and converted. A process of a multi-host job passes the rows
            its devices hold (``sam_jax.train.distributed.local_rows``). With
            ``pad_remainder`` every batch has ``stop - start`` rows (the padded
            ones zero, with mask 0); without it, the last incomplete batch may
            hold fewer rows, or none.

        Yields:
          dicts with numpy arrays.

        Raises:
          ValueError: a bad ``batch_size`` or ``rows``, or no batch at all.
        """
        _check_batch_size(batch_size)
        if drop_remainder and batch_size > self.num_examples:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {self.num_examples} examples of "
                f"{self.name}/{self.split} with drop_remainder=True: no batch would be produced"
            )
        rows = _check_rows(rows, batch_size)
        augmentation = self._resolve_augmentation(augment)
        order_seed, augment_seed = np.random.SeedSequence([seed, epoch]).spawn(2)
        order = np.arange(self.num_examples)
        if shuffle:
            order = np.random.default_rng(order_seed).permutation(self.num_examples)
        augment_rng = np.random.default_rng(augment_seed)
        with_mask = pad_remainder and not drop_remainder
        start, stop = (0, batch_size) if rows is None else (rows.start, rows.stop)
        for step in range(self.steps_per_epoch(batch_size, drop_remainder)):
            index = order[step * batch_size : (step + 1) * batch_size]
            # The selected rows that hold real examples (fewer in a last, short
            # batch); the augmentation still draws for all len(index) of them.
            real = slice(min(start, len(index)), min(stop, len(index)))
            picked = index[real]
            x = self._process(self.x[picked], augmentation, augment_rng, rows=real, total=len(index))
            batch = {"x": x, "y": self.y[picked]}
            if with_mask:
                batch = _pad_batch(batch, stop - start)
            yield batch

    def arrays(self) -> dict[str, np.ndarray]:
        """All examples, converted and normalized but not augmented."""
        return {"x": self._process(self.x, None, None), "y": self.y}

    def subset(self, n: int, *, seed: int | None = None) -> "Dataset":
        """The first ``n`` examples (or ``n`` random ones when ``seed`` is given)."""
        if not 0 < n <= self.num_examples:
            raise ValueError(f"subset size must be in [1, {self.num_examples}], got {n}")
        if seed is None:
            index = np.arange(n)
        else:
            index = np.sort(np.random.default_rng(seed).choice(self.num_examples, n, replace=False))
        return self.take(index)

    def take(self, index: np.ndarray) -> "Dataset":
        """A new Dataset with the examples at ``index`` (per_example arrays follow)."""
        return dataclasses.replace(
            self,
            x=self.x[index],
            y=self.y[index],
            per_example={key: value[index] for key, value in self.per_example.items()},
        )

    def split_validation(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Carve a validation split out of this one: ``(rest, validation)``.

        ``round(fraction * N)`` examples chosen uniformly at random by ``seed``
        (:func:`validation_indices`) form the validation part; the remaining ones
        the training part. Both keep the stored order, every ``per_example`` array
        (so noisy labels stay noisy, with their ``clean_y``) and the normalization;
        the validation part gets split name ``"validation"`` and no augmentation.
        Deterministic, disjoint, and together exactly this dataset.

        Args:
          fraction: share of the examples held out, in (0, 1).
          seed: seed of the held-out choice (independent of the run seed).

        Returns:
          ``(train_part, validation_part)``.
        """
        train_index, validation_index = validation_indices(self.num_examples, fraction, seed)
        info = {**self.info, "validation_fraction": float(fraction), "validation_seed": int(seed),
                "source_num_examples": self.num_examples}
        train = dataclasses.replace(self.take(train_index), info=info)
        validation = dataclasses.replace(self.take(validation_index), split="validation",
                                         augmentation=aug.Augmentation(), info=info)
        return train, validation

    def with_label_noise(self, fraction: float, seed: int = 0) -> "Dataset":
        """Symmetric label noise on exactly round(fraction * N) examples.

        The clean labels are kept in ``per_example["clean_y"]`` and the flipped
        examples in ``per_example["noisy"]``.
        """
        noisy_y, flipped = aug.flip_labels(self.y, fraction, self.num_classes, seed)
        per_example = dict(self.per_example)
        per_example.setdefault("clean_y", self.y)
        per_example["noisy"] = flipped
        return dataclasses.replace(self, y=noisy_y, per_example=per_example)

    def _resolve_augmentation(self, augment) -> aug.Augmentation | None:
        if isinstance(augment, aug.Augmentation):
            chosen = augment
        elif augment is True:
            chosen = self.augmentation
        elif augment is False or augment is None:
            return None
        else:
            raise ValueError(f"augment must be a bool or an Augmentation, got {augment!r}")
        if chosen.is_identity:
            return None
        if self.x.ndim != 4:
            raise ValueError(f"image augmentation needs NHWC inputs, got shape {self.x.shape}")
        return chosen

    def _process(self, x, augmentation, rng, rows=None, total=None) -> np.ndarray:
        """Augment and convert ``x``: rows ``rows`` of a batch of ``total`` when given."""
        if augmentation is not None:
            x = augmentation.geometric(x, rng, rows=rows, total=total)
        x = aug.to_float_normalized(x, self.normalization)
        if augmentation is not None:
            x = augmentation.erase(x, rng, rows=rows, total=total)
        return x


def validation_indices(num_examples: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (sorted) kept and held-out indices of a validation carve.

    ``round(fraction * num_examples)`` indices drawn without replacement by
    ``np.random.default_rng([seed, 0x5A1])`` are held out; the rest are kept.

    Raises:
      ValueError: ``fraction`` outside (0, 1), or a part that would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    held_out = int(round(fraction * num_examples))
    if not 0 < held_out < num_examples:
        raise ValueError(f"validation_fraction {fraction} of {num_examples} examples leaves "
                         f"{held_out} for validation and {num_examples - held_out} for training; "
                         "both must be > 0")
    chosen = np.random.default_rng([int(seed), 0x5A1]).choice(num_examples, held_out, replace=False)
    mask = np.zeros(num_examples, bool)
    mask[chosen] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_rows(rows, batch_size: int) -> slice | None:
    """``rows`` as ``slice(start, stop)`` with ``0 <= start < stop <= batch_size``."""
    if rows is None:
        return None
    if not isinstance(rows, slice):
        raise ValueError(f"rows must be a slice of the batch, got {rows!r}")
    if rows.step not in (None, 1):
        raise ValueError(f"rows must be contiguous (step 1), got {rows}")
    start = 0 if rows.start is None else rows.start
    stop = batch_size if rows.stop is None else rows.stop
    if not all(isinstance(v, (int, np.integer)) for v in (start, stop)):
        raise ValueError(f"rows must have int bounds, got {rows}")
    if not 0 <= start < stop <= batch_size:
        raise ValueError(f"rows {rows} must satisfy 0 <= start < stop <= batch_size "
                         f"= {batch_size}")
    return slice(int(start), int(stop))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    real = batch["y"].shape[0]
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    padded = {}
    for key, value in batch.items():
        pad = [(0, batch_size - real)] + [(0, 0)] * (value.ndim - 1)
        padded[key] = np.pad(value, pad)
    padded["mask"] = mask
    return padded
