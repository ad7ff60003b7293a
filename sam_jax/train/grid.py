"""Phase-diagram trainer: a whole grid of small patch-CNN trainings as one compiled program.

The experiments of Chen, Zhang, Kou, Chen, Hsieh, Gu (NeurIPS 2023) are grids of
small trainings -- test error over (sample size n, signal norm ||mu||) or (dimension
d, ||mu||), for SGD and SAM, several seeds per cell. Here one *cell* is one training
run: its data are generated inside JAX from the patch data model of
``sam_jax.data.embedded.patch_data`` (papers.md §3, [recalled]), the two-layer
:class:`~sam_jax.models.patch_cnn.PatchCNN` is trained by minibatch SGD or a
SAM-family transform of the library for a fixed number of steps, and it is evaluated.
:func:`train_grid` ``jax.vmap``-s that over cells (seeds are just more cells) around
a ``jax.lax.scan`` over steps, so that a 12 x 12 x 5-seed grid of one optimizer is
one jitted call::

    from sam_jax.train.grid import GridSpec, make_cells, train_grid
    spec = GridSpec(optimizer="sam", steps=400, batch_size=10, n_max=200, dim_max=400)
    cells = make_cells(n=[20, 50, 200], dim=400, signal_norm=[1, 2, 4], tau=0.5,
                       lr=0.1, seed=range(5))
    result = train_grid(spec, cells)
    result.final["test_err"]          # (cells,)

Per-cell values (traced, vary freely inside one compiled call): ``n``, ``dim``,
``signal_norm``, ``tau`` (the SAM radius), ``lr``, ``seed``. Everything that fixes
shapes or the algorithm is static, in :class:`GridSpec` (one compile per spec).

**Padding.** Every cell is padded to ``n_max`` training examples and ``dim_max``
feature dimensions and masked:

* minibatches are drawn only among the cell's own ``n`` examples (see ``sampling``),
  so the padded examples never enter a gradient; the masked train metrics ignore them;
* padded feature coordinates of every patch (and of mu) are 0, and the padded filter
  coordinates start at 0. The first layer is linear in the input, so the gradient of
  a padded filter coordinate is ``sum(relu' * x_c) = 0`` exactly: those coordinates
  stay 0 for ever, and neither the logits, nor ``||grad||`` (SAM's normalization), nor
  any inner product changes (``tests/test_train_grid.py`` checks both).
* The random numbers do not depend on the padding: every random array is drawn with
  a leading example axis from a per-coordinate key (``fold_in(key, c)``), and the
  partitionable threefry (``rng_key``: JAX's threefry numbers, computed by an unrolled
  hash that is faster on CPU) makes ``draw(key, (n, ...))`` a prefix of
  ``draw(key, (n_max, ...))``. So a cell padded inside a grid sees the
  same data, initialization and minibatches as the same cell run alone with
  ``n_max = n`` and ``dim_max = d``; the two agree to float tolerance, not bit for bit,
  because XLA may sum a longer, zero-padded axis (and a vmapped batch) in a different
  order (the test uses rtol 1e-5).

**Sampling.** ``sampling="replacement"`` (default): each step draws ``batch_size``
indices uniformly with replacement among the cell's n examples. Our choice: the
paper's minibatch SGD is recalled only as "batch B" (papers.md §3); it is the
cheapest scheme under ``vmap`` (the per-epoch argsort of ``"shuffle"`` costs more than
the SGD step itself here) and exactly padding-independent. ``sampling="shuffle"``:
random reshuffling -- each epoch a fresh uniform permutation of the cell's n
examples, cut into ``n // batch_size`` batches (the ``n % batch_size`` examples at
the end of a permutation are skipped that epoch).

**Optimizers.** ``optimizer`` is a name of ``sam_jax.make_perturbation`` chained
before ``optax.sgd(lr)`` (no momentum, no weight decay): ``"sgd"`` is plain minibatch
SGD and ``"sam"`` is exactly the variant analysed in the paper,
``W_hat = W + tau grad L_B(W) / ||grad L_B(W)||_F``, ``W <- W - lr grad L_B(W_hat)``
(with ``sam_eps`` = 0 by default: no epsilon in the normalization; a zero gradient
gives a zero perturbation). ``tau`` is a traced per-cell value.

**Loss.** The logistic loss ``log(1 + exp(-y f))``, written as softmax cross-entropy
of the model's 2-class logits ``[-f/2, f/2]`` (identical, see ``patch_cnn``), mean
over the minibatch.

**Metrics.** Evaluated at step 0 and every ``eval_every`` steps: masked train loss
and train error (on the observed, possibly flipped labels), test error on
``n_test`` fresh examples from the same distribution (observed labels: the Bayes
error is ``flip_prob``) and on their clean labels -- drawn in the filters' 2m-dim
projection, exact in distribution and independent of d (:func:`estimate_test_error`) -- plus
whatever ``eval_hook`` returns. A ``step_hook`` sees every step's minibatch, point and gradient; its values
are averaged over each ``eval_every`` window.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Optional

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import optax

from sam_jax.models.patch_cnn import PatchCNN
from sam_jax.optim.registry import make_perturbation

SAMPLING = ("shuffle", "replacement")


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The static settings of one compiled grid (shapes, algorithm, data model).

    Attributes:
      optimizer: ``sam_jax.make_perturbation`` name chained before ``optax.sgd(lr)``:
        ``"sgd"`` (plain minibatch SGD), ``"sam"`` (the paper's normalized SAM),
        ``"usam"``, ...
      steps: training steps per cell (fixed; a multiple of ``eval_every``).
      batch_size: B, the minibatch size (<= every cell's n).
      eval_every: steps between evaluations; ``None``: only at step 0 and the end.
      n_max: training examples every cell is padded to (>= every cell's n).
      dim_max: patch dimension every cell is padded to (>= every cell's d).
      n_test: test examples per evaluation (drawn in the filters' 2m-dim
        projection, see :func:`estimate_test_error`: the cost does not grow with d).
      num_patches: P (Kou et al. 2023 template: 2).
      width: m, filters per class (template: 10).
      sigma0: std of the filters' Gaussian initialization [recalled: "small"; the
        value is our choice, see the experiments].
      noise_std: sigma_p (template: 1).
      flip_prob: p, the label-flip probability (template: 0.1).
      sampling: ``"replacement"`` (default) or ``"shuffle"`` (per-epoch permutation).
      sam_eps: eps of ``sam_jax.sam``'s normalization (0: the paper's formula).
    """

    optimizer: str = "sgd"
    steps: int = 200
    batch_size: int = 10
    eval_every: Optional[int] = None
    n_max: int = 20
    dim_max: int = 100
    n_test: int = 1000
    num_patches: int = 2
    width: int = 10
    sigma0: float = 0.01
    noise_std: float = 1.0
    flip_prob: float = 0.1
    sampling: str = "replacement"
    sam_eps: float = 0.0

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.num_patches < 2:
            raise ValueError(f"num_patches must be >= 2, got {self.num_patches}")
        if not 0.0 <= self.flip_prob < 0.5:
            raise ValueError(f"flip_prob must be in [0, 0.5), got {self.flip_prob}")
        if self.batch_size < 1 or self.batch_size > self.n_max:
            raise ValueError(f"need 1 <= batch_size <= n_max, got {self.batch_size}, {self.n_max}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.eval_every is not None and (self.eval_every < 1 or self.steps % self.eval_every):
            raise ValueError(f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every})")
        if self.n_test < 1:
            raise ValueError(f"n_test must be >= 1, got {self.n_test}")

    @property
    def num_windows(self) -> int:
        return 1 if self.eval_every is None else self.steps // self.eval_every

    @property
    def window(self) -> int:
        return self.steps if self.eval_every is None else self.eval_every

    @property
    def eval_steps(self) -> np.ndarray:
        """The steps at which metrics are recorded: 0, then the end of every window."""
        return np.arange(self.num_windows + 1) * self.window

    def model(self) -> PatchCNN:
        return PatchCNN(num_classes=2, width=self.width, sigma0=self.sigma0)


def sam_radius(dim, *, tau_const: float, width: int, batch_size: int, num_patches: int,
               noise_std: float):
    """SAM radius ``tau = c m sqrt(B) / (P sigma_p sqrt(d))`` of Chen et al.

    The scaling is recalled (papers.md §3), the constant ``c = tau_const`` is a choice;
    ``dim`` may be an array (one tau per dimension).
    """
    return tau_const * width * np.sqrt(batch_size) / (
        num_patches * noise_std * np.sqrt(np.asarray(dim, np.float64)))


class Cells(NamedTuple):
    """Per-cell values, each an array of shape (C,) (traced inside the compiled grid)."""

    n: Any            # int32, training examples
    dim: Any          # int32, patch dimension d
    signal_norm: Any  # float32, ||mu||
    tau: Any          # float32, SAM radius (ignored by "sgd")
    lr: Any           # float32, learning rate eta
    seed: Any         # int32, the cell's seed (data, init, minibatches)

    @property
    def size(self) -> int:
        return int(np.shape(self.n)[0])

    def take(self, index) -> "Cells":
        """The cells at ``index`` (an int keeps a leading axis of 1)."""
        index = np.atleast_1d(np.asarray(index))
        return Cells(*(np.asarray(v)[index] for v in self))

    def row(self, i: int) -> dict:
        """Cell ``i`` as a dict of Python scalars."""
        return {k: np.asarray(v)[i].item() for k, v in self._asdict().items()}


def make_cells(*, n, dim, signal_norm, tau=0.0, lr=0.1, seed=0) -> Cells:
    """The Cartesian product of the given values (scalars or iterables) as :class:`Cells`.

    The order is ``itertools.product(n, dim, signal_norm, tau, lr, seed)``: the seed
    varies fastest, so ``result.final[k].reshape(..., num_seeds)`` groups seeds.
    """
    axes = [np.atleast_1d(np.asarray(list(v) if isinstance(v, Iterable) and not isinstance(v, str)
                                     else v)) for v in (n, dim, signal_norm, tau, lr, seed)]
    rows = list(itertools.product(*axes))
    columns = list(zip(*rows))
    dtypes = (np.int32, np.int32, np.float32, np.float32, np.float32, np.int32)
    return Cells(*(np.asarray(c, dtype=t) for c, t in zip(columns, dtypes)))


def cells_from_rows(rows: Iterable[dict]) -> Cells:
    """:class:`Cells` from dicts with the six fields (e.g. ``Cells.row`` outputs)."""
    rows = list(rows)
    dtypes = (np.int32, np.int32, np.float32, np.float32, np.float32, np.int32)
    return Cells(*(np.asarray([r[f] for r in rows], dtype=t) for f, t in zip(Cells._fields, dtypes)))


# ----------------------------------------------------------------------------- random numbers
#
# JAX lowers its threefry hash on CPU as a rolled ``fori_loop`` (5 iterations over the
# whole array, each materialized in memory): ~30 ns per 32-bit value here, which made
# generating the data (~40k Gaussians per cell at d = 200) cost more than 200 SGD
# steps. The same hash unrolled is one fused elementwise loop, ~6x faster. ``_RNG`` is
# a PRNG implementation (``jax.extend.random.define_prng_impl``) whose seed, split,
# fold_in and random bits are *bit for bit* those of JAX's default ``threefry2x32``
# with ``jax_threefry_partitionable`` (the default since jax 0.5), whatever that flag
# says: keys from ``jax.random.key(seed, impl=_RNG)`` give exactly the numbers of
# ``jax.random.PRNGKey(seed)`` through every ``jax.random`` sampler
# (``tests/test_train_grid.py`` checks it), only faster on CPU.


def _rotate_left(x, d: int):
    return jax.lax.shift_left(x, np.uint32(d)) | jax.lax.shift_right_logical(x, np.uint32(32 - d))


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (20 rounds), unrolled; the rounds of ``jax.random``'s."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _counts(shape: tuple):
    """The 64-bit iota over ``shape`` as (high, low) uint32 words (partitionable threefry)."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2 ** 32:
        raise NotImplementedError("more than 2**32 random values from one key")
    return jnp.zeros(shape, np.uint32), jax.lax.iota(np.uint32, size).reshape(shape)


def _rng_split(key, shape):
    bits1, bits2 = _threefry2x32(key[0], key[1], *_counts(tuple(shape)))
    return jnp.stack([bits1, bits2], axis=-1)


def _rng_fold_in(key, data):
    bits1, bits2 = _threefry2x32(key[0], key[1], np.uint32(0), jnp.asarray(data, np.uint32))
    return jnp.stack([bits1, bits2])


def _rng_bits(key, bit_width, shape):
    bits1, bits2 = _threefry2x32(key[0], key[1], *_counts(tuple(shape)))
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[bit_width]
    if bit_width == 64:
        bits = jax.lax.shift_left(bits1.astype(dtype), dtype(32)) | bits2.astype(dtype)
    else:
        bits = (bits1 ^ bits2).astype(dtype)
    return bits


_RNG = jax.extend.random.define_prng_impl(
    key_shape=(2,), seed=jax.extend.random.threefry_prng_impl.seed, split=_rng_split,
    random_bits=_rng_bits, fold_in=_rng_fold_in, name="threefry2x32_unrolled", tag="fry_u")


def rng_key(seed) -> jax.Array:
    """``jax.random.key(seed, impl=_RNG)``: the numbers of ``jax.random.PRNGKey(seed)``, faster on CPU."""
    return jax.random.key(seed, impl=_RNG)


# ----------------------------------------------------------------------------- data


def _coordinate_normal(key, num_coords: int, shape: tuple) -> jax.Array:
    """Standard normals of shape ``shape + (num_coords,)``, coordinate c from ``fold_in(key, c)``.

    Coordinate c's values do not depend on ``num_coords``, and (partitionable threefry)
    a shorter leading axis of ``shape`` gives a prefix: padding-independent draws.
    """
    # A loop over coordinates (``lax.map``), not a ``vmap``: the loop's output is a
    # materialized buffer. Vmapped, XLA:CPU fused the whole hash -> uniform -> erf_inv
    # chain into each consumer of the draws (the projection off mu, the patches, ...)
    # and recomputed it there: generating a cell's data cost ~2x more.
    draws = jax.lax.map(lambda c: jax.random.normal(jax.random.fold_in(key, c), shape),
                        jnp.arange(num_coords))  # (coords, *shape)
    return jnp.moveaxis(draws, 0, -1)


def _patches(key, size: int, mu, unit, dim_mask, spec: GridSpec) -> dict:
    """``size`` examples of the patch data model (the layout of ``patch_data``)."""
    k_label, k_flip, k_position, k_noise = (jax.random.fold_in(key, i) for i in range(4))
    clean_pm = jnp.where(jax.random.uniform(k_label, (size,)) < 0.5, -1.0, 1.0)
    flipped = jax.random.uniform(k_flip, (size,)) < spec.flip_prob
    observed_pm = jnp.where(flipped, -clean_pm, clean_pm)
    position = jax.random.randint(k_position, (size,), 0, spec.num_patches)
    noise = spec.noise_std * _coordinate_normal(k_noise, spec.dim_max, (size, spec.num_patches - 1))
    noise = noise * dim_mask
    noise = noise - (noise @ unit)[..., None] * unit  # xi ⊥ mu
    # Patch p is the signal where p == position, else noise patch p (p < position) or p - 1.
    patches = []
    for p in range(spec.num_patches):
        slot = jnp.where(p < position, p, p - 1).clip(0, spec.num_patches - 2)
        noise_p = noise[:, 0]  # a select chain, not a gather (XLA:CPU gathers are slow under vmap)
        for s in range(1, spec.num_patches - 1):
            noise_p = jnp.where((slot == s)[:, None], noise[:, s], noise_p)
        patches.append(jnp.where((position == p)[:, None], clean_pm[:, None] * mu, noise_p))
    to_class = lambda pm: ((pm + 1) // 2).astype(jnp.int32)  # noqa: E731
    return {"x": jnp.stack(patches, axis=1), "y": to_class(observed_pm), "clean_y": to_class(clean_pm),
            "flipped": flipped, "position": position, "noise": noise}


def _keys(seed):
    key = rng_key(seed)
    return {name: jax.random.fold_in(key, i) for i, name in
            enumerate(("signal", "train", "test", "init", "sample"))}


def generate_cell(spec: GridSpec, cell: Cells) -> dict:
    """The data of one cell (unbatched ``cell`` fields), padded to ``n_max`` x ``dim_max``.

    Returns a dict: ``x`` (n_max, P, dim_max), ``y``, ``clean_y``, ``flipped``,
    ``position``, ``noise`` (n_max, P-1, dim_max) as in ``patch_data``'s
    ``per_example``; ``mask`` (n_max,) 1 for the cell's real examples; ``dim_mask``
    (dim_max,); ``signal`` mu (dim_max,).
    """
    keys = _keys(cell.seed)
    dim_mask = (jnp.arange(spec.dim_max) < cell.dim).astype(jnp.float32)
    direction = _coordinate_normal(keys["signal"], spec.dim_max, ()) * dim_mask
    unit = direction / jnp.linalg.norm(direction)
    mu = cell.signal_norm * unit
    data = _patches(keys["train"], spec.n_max, mu, unit, dim_mask, spec)
    data["mask"] = (jnp.arange(spec.n_max) < cell.n).astype(jnp.float32)
    data["dim_mask"] = dim_mask
    data["signal"] = mu
    data["unit"] = unit
    return data


def explicit_test_set(spec: GridSpec, cell: Cells, data: dict, size: int, key=None) -> dict:
    """``size`` explicit test examples of a cell (same mu; for checks, see :func:`estimate_test_error`)."""
    key = jax.random.fold_in(_keys(cell.seed)["test"], 99) if key is None else key
    return _patches(key, size, data["signal"], data["unit"], data["dim_mask"], spec)


def init_params(spec: GridSpec, cell: Cells, data: dict) -> dict:
    """PatchCNN params ``{"filters": (2, m, dim_max)}``, N(0, sigma0^2), padded coordinates 0."""
    filters = spec.sigma0 * _coordinate_normal(_keys(cell.seed)["init"], spec.dim_max, (2, spec.width))
    return {"filters": filters * data["dim_mask"]}


# ----------------------------------------------------------------------------- training


def patch_logits(spec: GridSpec, params, x) -> jax.Array:
    """The PatchCNN's 2-class logits ``[-f/2, f/2]`` (``PatchCNN(num_classes=2).apply``).

    The same function as the Flax module, written as one (N P, d) x (d, 2m) matmul:
    under ``vmap`` over cells XLA:CPU runs this ~2x faster than the module's
    ``einsum("npd,jmd->njmp")`` (measured here). ``tests/test_train_grid.py`` checks
    that both give the same logits.
    """
    filters = params["filters"]  # (2, m, d)
    n, num_patches, dim = x.shape
    pre = x.reshape(n * num_patches, dim) @ filters.reshape(2 * spec.width, dim).T
    per_class = jax.nn.relu(pre).reshape(n, num_patches, 2, spec.width).sum(axis=(1, 3)) / spec.width
    margin = per_class[:, 1] - per_class[:, 0]
    return jnp.stack([-margin / 2, margin / 2], axis=-1)


def loss_fn(spec: GridSpec, params, x, y) -> jax.Array:
    """Mean logistic loss ``log(1 + exp(-y f))``: softmax cross-entropy of the 2-class logits."""
    return optax.softmax_cross_entropy_with_integer_labels(patch_logits(spec, params, x), y).mean()


def make_optimizer(spec: GridSpec, tau, lr) -> optax.GradientTransformationExtraArgs:
    """``make_perturbation(spec.optimizer, tau)`` chained before ``optax.sgd(lr)``."""
    kwargs = {"eps": spec.sam_eps} if spec.optimizer == "sam" else {}
    return optax.chain(make_perturbation(spec.optimizer, tau, **kwargs), optax.sgd(lr))


def batch_indices(spec: GridSpec, cell: Cells, step) -> jax.Array:
    """Indices (batch_size,) of the minibatch of ``step``, all < the cell's n."""
    key = _keys(cell.seed)["sample"]
    if spec.sampling == "replacement":
        return jax.random.randint(jax.random.fold_in(key, step), (spec.batch_size,), 0, cell.n)
    per_epoch = jnp.maximum(cell.n // spec.batch_size, 1)
    epoch, position = step // per_epoch, step % per_epoch
    scores = jax.random.uniform(jax.random.fold_in(key, epoch), (spec.n_max,))
    scores = jnp.where(jnp.arange(spec.n_max) < cell.n, scores, 2.0)  # padding sorts last
    permutation = jnp.argsort(scores)
    return jax.lax.dynamic_slice(permutation, (position * spec.batch_size,), (spec.batch_size,))


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


# step_hook(spec, cell, params, grads, batch) -> dict of scalars (averaged per window)
StepHook = Callable[..., dict]
# eval_hook(spec, cell, params, data) -> dict of scalars / arrays (recorded at eval steps)
EvalHook = Callable[..., dict]


def init_state(spec: GridSpec, cell: Cells) -> tuple[dict, TrainState]:
    """(data, state) of one cell at step 0."""
    data = generate_cell(spec, cell)
    params = init_params(spec, cell, data)
    opt_state = make_optimizer(spec, cell.tau, cell.lr).init(params)
    return data, TrainState(params, opt_state)


def train_step(spec: GridSpec, cell: Cells, data: dict, state: TrainState, step,
               step_hook: Optional[StepHook] = None) -> tuple[TrainState, dict]:
    """One minibatch step of one cell; returns (state, {"batch_loss", **step_hook}).

    The single source of the training math: :func:`train_grid` scans and vmaps it and
    the benchmark's Python loop jits it alone.
    """
    index = batch_indices(spec, cell, step)
    rows = lambda a: jax.vmap(lambda i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False))(index)  # noqa: E731
    # (a vmapped dynamic index: ~4x faster than fancy indexing under the grid's vmap)
    batch = {k: rows(data[k]) for k in ("x", "y", "clean_y", "flipped", "noise", "position")}
    grad_fn = lambda p: jax.grad(loss_fn, argnums=1)(spec, p, batch["x"], batch["y"])  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(spec, state.params, batch["x"], batch["y"])
    tx = make_optimizer(spec, cell.tau, cell.lr)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    metrics = {"batch_loss": loss}
    if step_hook is not None:
        metrics.update(step_hook(spec, cell, state.params, grads, batch))
    return TrainState(optax.apply_updates(state.params, updates), opt_state), metrics


def _masked_mean(values, mask):
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def margin_from_projections(signal_proj, noise_proj, clean_pm, width: int) -> jax.Array:
    """The PatchCNN margin f from the filters' inner products with the patches.

    f = F_{+1} - F_{-1}, F_j = (1/m) sum_r [relu(<w_{j,r}, yhat mu>) + sum_p relu(<w_{j,r}, xi_p>)]:
    the patch order does not matter (the model sums over patches).

    Args:
      signal_proj: (2, m), <w_{j,r}, mu>.
      noise_proj: (N, P-1, 2, m), <w_{j,r}, xi_{i,p}>.
      clean_pm: (N,), yhat in {-1, +1}.
      width: m.
    """
    signal = jax.nn.relu(clean_pm[:, None, None] * signal_proj[None])  # (N, 2, m)
    noise = jax.nn.relu(noise_proj).sum(axis=1)  # (N, 2, m)
    per_class = (signal + noise).sum(axis=-1) / width
    return per_class[:, 1] - per_class[:, 0]


def estimate_test_error(spec: GridSpec, cell: Cells, params, data: dict) -> tuple[jax.Array, jax.Array]:
    """Test error (observed labels, clean labels) on ``n_test`` fresh examples, in 2m dimensions.

    The model sees a noise patch xi only through its 2m inner products with the
    filters, z = W xi, a Gaussian vector N(0, sigma_p^2 W_perp W_perp^T) with
    W_perp = W (I - u u^T). Drawing z from that law (``n_test`` x (P-1) x 2m normals,
    independent of d) instead of xi itself (x d) gives test errors with exactly the
    distribution of those on explicit test examples (``tests/test_train_grid.py``
    checks both against each other), at a cost independent of the dimension. The
    standard normals are fixed per cell, so the curves over iterations use one test
    sample (common random numbers) in whitened coordinates.
    """
    key = _keys(cell.seed)["test"]
    k_label, k_flip, k_noise = (jax.random.fold_in(key, i) for i in range(3))
    size, m = spec.n_test, spec.width
    clean_pm = jnp.where(jax.random.uniform(k_label, (size,)) < 0.5, -1.0, 1.0)
    flipped = jax.random.uniform(k_flip, (size,)) < spec.flip_prob
    observed_pm = jnp.where(flipped, -clean_pm, clean_pm)
    filters = params["filters"]  # (2, m, D)
    signal_proj = jnp.einsum("jmd,d->jm", filters, data["signal"])
    perp = filters - jnp.einsum("jmd,d->jm", filters, data["unit"])[..., None] * data["unit"]
    flat = perp.reshape(2 * m, -1)
    covariance = spec.noise_std ** 2 * flat @ flat.T
    values, vectors = jnp.linalg.eigh(covariance)
    root = vectors * jnp.sqrt(jnp.clip(values, 0.0))  # covariance = root root^T
    standard = jax.random.normal(k_noise, (size, spec.num_patches - 1, 2 * m))
    noise_proj = (standard @ root.T).reshape(size, spec.num_patches - 1, 2, m)
    predicted_pm = jnp.where(margin_from_projections(signal_proj, noise_proj, clean_pm, m) > 0, 1.0, -1.0)
    return jnp.mean(predicted_pm != observed_pm), jnp.mean(predicted_pm != clean_pm)


def evaluate_cell(spec: GridSpec, cell: Cells, params, data: dict,
                  eval_hook: Optional[EvalHook] = None) -> dict:
    """Train loss / error (masked, observed labels), test error (observed and clean labels)."""
    logits = patch_logits(spec, params, data["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, data["y"])
    wrong = (jnp.argmax(logits, -1) != data["y"]).astype(jnp.float32)
    metrics = {"train_loss": _masked_mean(losses, data["mask"]),
               "train_err": _masked_mean(wrong, data["mask"])}
    metrics["test_err"], metrics["test_err_clean"] = estimate_test_error(spec, cell, params, data)
    if eval_hook is not None:
        metrics.update(eval_hook(spec, cell, params, data))
    return metrics


def run_cell(spec: GridSpec, cell: Cells, step_hook: Optional[StepHook] = None,
             eval_hook: Optional[EvalHook] = None) -> dict:
    """One whole training of one cell (unbatched): data, scan over steps, evaluations.

    Returns a dict: ``params`` (final), ``history`` (metrics at ``spec.eval_steps``,
    leading axis num_windows + 1), ``window`` (step-hook means and the mean batch loss
    per window, leading axis num_windows).
    """
    data, state = init_state(spec, cell)
    first = evaluate_cell(spec, cell, state.params, data, eval_hook)

    def one_step(state, step):
        return train_step(spec, cell, data, state, step, step_hook)

    def one_window(state, window_index):
        steps = window_index * spec.window + jnp.arange(spec.window)
        state, step_metrics = jax.lax.scan(one_step, state, steps)
        evaluation = evaluate_cell(spec, cell, state.params, data, eval_hook)
        return state, (evaluation, jax.tree.map(lambda v: v.mean(axis=0), step_metrics))

    state, (evaluations, windows) = jax.lax.scan(one_window, state, jnp.arange(spec.num_windows))
    history = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, evaluations)
    return {"params": state.params, "history": history, "window": windows}


@functools.lru_cache(maxsize=32)
def compiled_grid(spec: GridSpec, step_hook: Optional[StepHook] = None,
                  eval_hook: Optional[EvalHook] = None):
    """``jax.jit(jax.vmap(run_cell))`` for this spec and hooks (cached: one compile each)."""
    return jax.jit(jax.vmap(functools.partial(run_cell, spec, step_hook=step_hook, eval_hook=eval_hook)))


@dataclasses.dataclass(frozen=True)
class GridResult:
    """What :func:`train_grid` returns (numpy arrays, leading axis = cells).

    Attributes:
      spec, cells: the inputs.
      params: final params (``filters`` (C, 2, m, dim_max)).
      history: metric -> (C, num_windows + 1) at ``spec.eval_steps``.
      window: metric -> (C, num_windows), means over each window's steps.
      final: metric -> (C,), the last column of ``history``.
    """

    spec: GridSpec
    cells: Cells
    params: dict
    history: dict
    window: dict

    @property
    def final(self) -> dict:
        return {k: v[:, -1] for k, v in self.history.items()}


def check_cells(spec: GridSpec, cells: Cells) -> None:
    """ValueError if a cell does not fit the spec's padding or batch size."""
    n, dim = np.asarray(cells.n), np.asarray(cells.dim)
    if np.any(n > spec.n_max) or np.any(dim > spec.dim_max):
        raise ValueError(f"cells exceed the padding: max n {n.max()} > {spec.n_max} "
                         f"or max dim {dim.max()} > {spec.dim_max}")
    if np.any(n < spec.batch_size):
        raise ValueError(f"every cell needs n >= batch_size ({spec.batch_size}), got min n {n.min()}")
    if np.any(dim < 2):
        raise ValueError("every cell needs dim >= 2")


def train_grid(spec: GridSpec, cells: Cells, *, step_hook: Optional[StepHook] = None,
               eval_hook: Optional[EvalHook] = None, chunk_cells: Optional[int] = None) -> GridResult:
    """Train every cell of ``cells`` under ``spec`` in one jitted, vmapped call.

    Args:
      spec: static settings (one compilation per distinct spec and hooks).
      cells: per-cell values (:func:`make_cells`).
      step_hook, eval_hook: optional module-level functions (hashable: they key the
        compile cache), see :func:`train_step` and :func:`evaluate_cell`.
      chunk_cells: run the cells in calls of this many (bounds memory; every call
        reuses the one compiled program, the last chunk padded by repeating a cell).

    Returns:
      :class:`GridResult`.
    """
    check_cells(spec, cells)
    fn = compiled_grid(spec, step_hook, eval_hook)
    total = cells.size
    size = total if chunk_cells is None else min(chunk_cells, total)
    outputs = []
    for start in range(0, total, size):
        index = np.arange(start, start + size)
        index = np.minimum(index, total - 1)  # pad the last chunk (same shape: no recompile)
        chunk = Cells(*(jnp.asarray(np.asarray(v)[index]) for v in cells))
        out = jax.device_get(fn(chunk))
        keep = min(size, total - start)
        outputs.append(jax.tree.map(lambda a: np.asarray(a)[:keep], out))
    merged = jax.tree.map(lambda *a: np.concatenate(a), *outputs)
    return GridResult(spec, cells, merged["params"], merged["history"], merged["window"])
