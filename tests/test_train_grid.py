"""The phase-diagram trainer (sam_jax.train.grid): data model, padding, SAM step, sampling."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.data.embedded import patch_data
from sam_jax.train import grid
from sam_jax.train.grid import Cells, GridSpec, make_cells, train_grid

SMALL = GridSpec(optimizer="sam", steps=24, batch_size=4, eval_every=8, n_max=16, dim_max=12,
                 n_test=40, width=3, sigma0=0.1)


def one_cell(**kw) -> Cells:
    values = dict(n=10, dim=9, signal_norm=2.0, tau=0.3, lr=0.1, seed=3)
    values.update(kw)
    return make_cells(**values)


def unbatched(cells: Cells, i: int = 0) -> Cells:
    return Cells(*(jnp.asarray(np.asarray(v)[i]) for v in cells))


# ---------------------------------------------------------------------- data model


def test_generator_matches_the_patch_data_model():
    spec = GridSpec(n_max=4000, dim_max=50, num_patches=3, noise_std=1.5, flip_prob=0.2)
    cell = unbatched(make_cells(n=4000, dim=40, signal_norm=3.0, seed=1))
    data = jax.device_get(jax.jit(grid.generate_cell, static_argnums=0)(spec, cell))
    mu, d, n = data["signal"], 40, 4000
    np.testing.assert_allclose(np.linalg.norm(mu), 3.0, rtol=1e-5)
    assert np.all(mu[d:] == 0) and np.all(data["x"][..., d:] == 0)
    pm = 2.0 * data["clean_y"] - 1
    rows = np.arange(n)
    # the signal patch is yhat * mu, at the recorded position
    np.testing.assert_allclose(data["x"][rows, data["position"]], pm[:, None] * mu, atol=1e-6)
    # the other patches are the noise patches, in order, orthogonal to mu
    slots = np.arange(3)[None, :] != data["position"][:, None]
    np.testing.assert_allclose(data["x"][slots].reshape(n, 2, -1), data["noise"], atol=1e-6)
    assert np.max(np.abs(data["noise"] @ mu)) < 1e-4
    # observed label = clean label flipped where "flipped"
    assert np.array_equal(data["y"] != data["clean_y"], data["flipped"])
    # rates within 4 standard errors: flips p, classes 1/2, positions 1/P
    se = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # noqa: E731
    assert abs(data["flipped"].mean() - 0.2) < se(0.2)
    assert abs(data["clean_y"].mean() - 0.5) < se(0.5)
    assert np.all(np.abs(np.bincount(data["position"], minlength=3) / n - 1 / 3) < se(1 / 3))
    # noise covariance sigma_p^2 (I - u u^T): E||xi||^2 = sigma_p^2 (d - 1), same as patch_data
    ours = np.mean(np.sum(data["noise"] ** 2, -1))
    ref = patch_data(n=4000, num_patches=3, dim=40, noise_std=1.5, signal_norm=3.0, flip_prob=0.2)
    theirs = np.mean(np.sum(ref.per_example["noise"] ** 2, -1))
    np.testing.assert_allclose(ours, 1.5 ** 2 * 39, rtol=0.02)
    np.testing.assert_allclose(theirs, 1.5 ** 2 * 39, rtol=0.02)
    assert abs(ref.per_example["noisy"].mean() - data["flipped"].mean()) < 2 * se(0.2)


def test_data_is_independent_of_the_padding():
    cell = unbatched(one_cell())
    small = GridSpec(n_max=10, dim_max=9, batch_size=4)
    big = GridSpec(n_max=16, dim_max=12, batch_size=4)
    generate = jax.jit(grid.generate_cell, static_argnums=0)
    a = jax.device_get(generate(small, cell))
    b = jax.device_get(generate(big, cell))
    for key in ("y", "clean_y", "flipped", "position"):
        assert np.array_equal(a[key], b[key][:10])
    np.testing.assert_allclose(a["x"], b["x"][:10, :, :9], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b["mask"], np.arange(16) < 10)
    pa = grid.init_params(small, cell, a)["filters"]
    pb = grid.init_params(big, cell, b)["filters"]
    np.testing.assert_array_equal(pa, pb[..., :9])
    assert np.all(pb[..., 9:] == 0)


def test_projected_test_error_matches_explicit_test_examples():
    """The 2m-dim evaluation: the margin equals the model's; errors agree in distribution."""
    spec = GridSpec(n_max=10, dim_max=30, num_patches=3, width=4, sigma0=1.0, flip_prob=0.2,
                    n_test=20000, noise_std=0.7)
    cell = unbatched(make_cells(n=10, dim=25, signal_norm=0.8, seed=5))

    @jax.jit
    def both(cell):
        data, state = grid.init_state(spec, cell)
        params = {"filters": state.params["filters"] + 0.5 * data["signal"]  # some signal learning
                  * jnp.array([-1.0, 1.0])[:, None, None]}
        test = grid.explicit_test_set(spec, cell, data, 20000)
        logits = spec.model().apply({"params": params}, test["x"])
        f = params["filters"]
        margin = grid.margin_from_projections(
            jnp.einsum("jmd,d->jm", f, data["signal"]), jnp.einsum("jmd,npd->npjm", f, test["noise"]),
            2.0 * test["clean_y"] - 1, spec.width)
        predicted = jnp.argmax(logits, -1)
        explicit = (jnp.mean(predicted != test["y"]), jnp.mean(predicted != test["clean_y"]))
        return logits, margin, explicit, grid.estimate_test_error(spec, cell, params, data)

    logits, margin, explicit, projected = jax.device_get(both(cell))
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], margin, rtol=1e-4, atol=1e-5)
    for a, b in zip(explicit, projected):  # two independent samples of 20,000: 5 standard errors
        assert 0.05 < a < 0.95
        assert abs(a - b) < 5 * np.sqrt(2 * a * (1 - a) / 20000), (a, b)


# ---------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampling", ["shuffle", "replacement"])
def test_minibatches_only_use_real_examples_and_ignore_padding(sampling):
    cell = unbatched(one_cell(n=10))
    big = GridSpec(n_max=16, dim_max=12, batch_size=4, sampling=sampling)
    small = dataclasses.replace(big, n_max=10, dim_max=9)
    steps = jnp.arange(40)
    a = jax.vmap(lambda t: grid.batch_indices(small, cell, t))(steps)
    b = jax.vmap(lambda t: grid.batch_indices(big, cell, t))(steps)
    assert np.array_equal(a, b) and np.all(np.asarray(a) < 10)
    if sampling == "shuffle":  # 2 batches per epoch from one permutation: no repeats
        for epoch in range(20):
            chosen = np.asarray(a[2 * epoch: 2 * epoch + 2]).ravel()
            assert len(set(chosen.tolist())) == 8


# ---------------------------------------------------------------------- the step


def test_fast_logits_equal_the_flax_patch_cnn():
    spec = GridSpec(width=4, dim_max=7, num_patches=3)
    model = spec.model()
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 3, 7))
    variables = model.init(jax.random.PRNGKey(3), x)
    np.testing.assert_allclose(grid.patch_logits(spec, variables["params"], x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-6)


def test_loss_is_the_logistic_loss():
    spec = GridSpec(width=3, dim_max=5)
    params = {"filters": jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))}
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 2, 5))
    y = jnp.array([0, 1, 1, 0, 1, 0, 1])
    relu_sum = lambda j: jnp.maximum(jnp.einsum("npd,md->nmp", x, params["filters"][j]), 0).sum((1, 2)) / 3  # noqa: E731
    f = relu_sum(1) - relu_sum(0)
    expected = jnp.mean(jnp.log1p(jnp.exp(-(2 * y - 1) * f)))
    np.testing.assert_allclose(grid.loss_fn(spec, params, x, y), expected, rtol=1e-5)


def test_sam_step_with_traced_tau_is_the_papers_update():
    """W <- W - lr grad L_B(W + tau g/||g||_F), tau per cell (traced under vmap)."""
    spec = dataclasses.replace(SMALL, n_max=10, dim_max=9)
    cells = make_cells(n=10, dim=9, signal_norm=2.0, tau=[0.0, 0.3, 0.7], lr=0.2, seed=3)

    def one(cell):
        data, state = grid.init_state(spec, cell)
        new, _ = grid.train_step(spec, cell, data, state, 0)
        return data, state.params, new.params

    data, before, after = jax.jit(jax.vmap(one))(Cells(*map(jnp.asarray, cells)))
    index = grid.batch_indices(spec, unbatched(cells), 0)
    x, y = data["x"][0][index], data["y"][0][index]
    w = before["filters"][0]
    grad = lambda f: jax.grad(lambda f: grid.loss_fn(spec, {"filters": f}, x, y))(f)  # noqa: E731
    g = grad(w)
    for i, tau in enumerate([0.0, 0.3, 0.7]):
        expected = w - 0.2 * grad(w + tau * g / jnp.linalg.norm(g))
        np.testing.assert_allclose(after["filters"][i], expected, rtol=1e-5, atol=1e-7)


def test_padded_filter_coordinates_get_exactly_zero_gradient():
    spec = SMALL
    cell = unbatched(one_cell(dim=7))
    data, state = grid.init_state(spec, cell)
    x, y = data["x"][:4], data["y"][:4]
    g = jax.grad(lambda p: grid.loss_fn(spec, p, x, y))(state.params)["filters"]
    assert np.all(np.asarray(g)[..., 7:] == 0.0) and np.any(np.asarray(g)[..., :7] != 0)


# ---------------------------------------------------------------------- the grid


@pytest.fixture(scope="module")
def mixed_grid():
    cells = grid.cells_from_rows([
        dict(n=10, dim=9, signal_norm=2.0, tau=0.3, lr=0.1, seed=3),
        dict(n=16, dim=12, signal_norm=0.5, tau=0.6, lr=0.2, seed=1),
        dict(n=6, dim=5, signal_norm=4.0, tau=0.1, lr=0.1, seed=2),
    ])
    return cells, train_grid(SMALL, cells)


def test_a_masked_cell_equals_the_same_cell_run_alone(mixed_grid):
    """Float tolerance, not bit for bit: longer zero-padded sums may be reduced in another order."""
    cells, result = mixed_grid
    for i, (n, d) in [(0, (10, 9)), (2, (6, 5))]:  # cell 1 fills the padding
        alone_spec = dataclasses.replace(SMALL, n_max=n, dim_max=d)
        alone = train_grid(alone_spec, cells.take(i))
        np.testing.assert_allclose(result.params["filters"][i, ..., :d], alone.params["filters"][0],
                                   rtol=1e-5, atol=1e-6)
        assert np.all(result.params["filters"][i, ..., d:] == 0)  # padded coordinates never move
        for key in result.history:
            np.testing.assert_allclose(result.history[key][i], alone.history[key][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.window["batch_loss"][i], alone.window["batch_loss"][0], rtol=1e-5)


def test_history_shapes_and_chunking(mixed_grid):
    cells, result = mixed_grid
    assert result.history["test_err"].shape == (3, 4)  # step 0 + 3 windows
    assert result.window["batch_loss"].shape == (3, 3)
    np.testing.assert_array_equal(SMALL.eval_steps, [0, 8, 16, 24])


def test_final_metrics_are_those_of_the_final_params(mixed_grid):
    """``final`` evaluates the returned params: the train error recounted with the Flax
    PatchCNN on the cell's n real examples (not the padding), the test error a count
    of mistakes on the n_test = 40 test examples of the projected evaluation."""
    cells, result = mixed_grid

    @jax.jit
    def evaluate(cell, filters):  # one cell, no vmap; the padding is cut on the host
        data = grid.generate_cell(SMALL, cell)
        params = {"filters": filters}
        wrong = jnp.argmax(SMALL.model().apply({"params": params}, data["x"]), -1) != data["y"]
        return wrong, grid.estimate_test_error(SMALL, cell, params, data)[0]

    for i in range(cells.size):
        cell = unbatched(cells, i)
        n = int(cell.n)
        wrong, test_err = evaluate(cell, jnp.asarray(result.params["filters"][i]))
        assert result.final["train_err"][i] == pytest.approx(np.sum(np.asarray(wrong)[:n]) / n, abs=1e-6)
        assert round(result.final["test_err"][i] * 40) == round(float(test_err) * 40)
    counts = result.final["test_err"] * 40
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)


@pytest.mark.slow
def test_chunked_calls_equal_one_call(mixed_grid):
    cells, result = mixed_grid
    chunked = train_grid(SMALL, cells, chunk_cells=2)  # one compiled program, 2 calls, last padded
    np.testing.assert_allclose(chunked.params["filters"], result.params["filters"], rtol=1e-6, atol=1e-7)
    for key in result.history:
        np.testing.assert_allclose(chunked.history[key], result.history[key], rtol=1e-6, atol=1e-7)


def test_cells_are_checked():
    with pytest.raises(ValueError, match="padding"):
        train_grid(SMALL, make_cells(n=20, dim=5, signal_norm=1.0))
    with pytest.raises(ValueError, match="batch_size"):
        train_grid(SMALL, make_cells(n=3, dim=5, signal_norm=1.0))
    with pytest.raises(ValueError, match="multiple"):
        GridSpec(steps=10, eval_every=3)
    cells = make_cells(n=[10, 12], dim=5, signal_norm=[1.0, 2.0], seed=[0, 1, 2])
    assert cells.size == 12 and cells.row(0) == dict(n=10, dim=5, signal_norm=1.0, tau=0.0,
                                                     lr=pytest.approx(0.1), seed=0)
    assert np.array_equal(cells.seed[:3], [0, 1, 2])  # seed varies fastest


def test_unrolled_threefry_is_bit_for_bit_jax_threefry():
    """grid's fast PRNG gives exactly the numbers of jax.random.PRNGKey through every sampler used."""
    for seed in (3, -7):
        ours, theirs = grid.rng_key(seed), jax.random.PRNGKey(seed)
        assert np.array_equal(jax.random.key_data(ours), theirs)
        draws = [lambda k: jax.random.normal(jax.random.fold_in(k, 5), (7, 3)),
                 lambda k: jax.random.uniform(k, (11,)),
                 lambda k: jax.random.randint(jax.random.fold_in(k, 17), (10,), 0, 137),
                 lambda k: jax.random.bits(k, (3, 4), dtype=jnp.uint8),
                 lambda k: jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(k, c), (4, 1)))(jnp.arange(9))]
        for draw in draws:
            np.testing.assert_array_equal(jax.jit(draw)(ours), jax.jit(draw)(theirs))
        split = jax.random.key_data(jax.random.split(ours, (2, 3)))
        np.testing.assert_array_equal(split, jax.random.split(theirs, (2, 3)).reshape(2, 3, 2))
