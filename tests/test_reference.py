"""Differential tests against devinterp 2.0.1's torch SGLD.

Both samplers take the same steps from the same params, gradients and noise:
devinterp's ``torch.normal`` is replaced by a function that returns the noise
that ``sgld_optax`` draws (reconstructed from the state's key by the
float64 reference of ``sgld_testing``), so params, metrics and sketches must
agree.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgld_optax as so
from sgld_testing import reference_step_noise

torch = pytest.importorskip("torch")
di_sgld = pytest.importorskip("devinterp.optim.sgld")
di_sketch = pytest.importorskip("devinterp.optim.sketch")

SHAPES = [(3, 4), (), (5,), (2, 3, 2)]


def _random_params(rng):
    return {f"p{i}": rng.normal(size=s).astype(np.float32)
            for i, s in enumerate(SHAPES)}


def _random_mask(rng):
    return {f"p{i}": rng.random(size=s) < 0.6 for i, s in enumerate(SHAPES)}


def _loss_grad(leaves):
    """A fixed nonlinear loss, so gradients change as params move."""
    return [np.sin(x) + 0.3 * x**2 for x in leaves]


def _oracle_noise(key, params, steps):
    """The noise sgld draws: one (step, leaf) array per leaf and step."""
    leaves = jax.tree_util.tree_leaves(params)
    out = []
    for _ in range(steps):
        out.append([eta.astype(np.float32)
                    for eta in reference_step_noise(key, leaves)])
        key = jax.random.split(key)[0]
    return out


def _run_devinterp(params, mask, noise, hp, steps, monkeypatch, sketch=None):
    """Runs devinterp's SGLD with one param group per leaf."""
    leaves = jax.tree_util.tree_leaves(params)
    mleaves = (jax.tree_util.tree_leaves(mask) if mask is not None
               else [None] * len(leaves))
    tparams = [torch.nn.Parameter(torch.tensor(np.array(x))) for x in leaves]
    groups = []
    for p, m in zip(tparams, mleaves):
        g = {"params": [p]}
        if m is not None:
            g["mask"] = torch.tensor(np.asarray(m, np.float32))
        groups.append(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = di_sgld.SGLD(
            groups, lr=hp["lr"], nbeta=hp["nbeta"],
            noise_level=hp["noise_level"], weight_decay=hp["weight_decay"],
            localization=hp["localization"],
            bounding_box_size=hp["bounding_box_size"],
            save_metrics=True,
            sketch_dim=None if sketch is None else sketch.output_dim)
    if sketch is not None:
        opt._sketch = sketch
    queue = []

    def fake_normal(mean, std, size, device=None, generator=None):
        return torch.tensor(queue.pop(0)).reshape(size) * std

    monkeypatch.setattr(di_sgld.torch, "normal", fake_normal)
    history = []
    for t in range(steps):
        queue.extend(noise[t])
        grads = _loss_grad([p.detach().numpy() for p in tparams])
        for p, g in zip(tparams, grads):
            p.grad = torch.tensor(g)
        opt.step()
        m = opt.get_metrics()
        history.append((
            [p.detach().numpy().copy() for p in tparams],
            {f: float(getattr(m, f)) for f in _METRIC_FIELDS} | {"numel": m.numel},
            opt.get_sketches() if sketch is not None else None))
    monkeypatch.undo()
    return history


_METRIC_FIELDS = ("scaled_grad", "unscaled_grad", "localization",
                  "weight_decay", "noise", "distance", "dot_grad_prior",
                  "dot_grad_noise", "dot_prior_noise")


def _run_ours(params, mask, hp, steps, key, sketch=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tx = so.sgld(hp["lr"], nbeta=hp["nbeta"], noise_level=hp["noise_level"],
                     weight_decay=hp["weight_decay"],
                     localization=hp["localization"],
                     bounding_box_size=hp["bounding_box_size"], mask=mask,
                     save_metrics=True, sketch=sketch, key=key)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    treedef = jax.tree_util.tree_structure(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree_util.tree_unflatten(treedef, [
            jnp.sin(x) + 0.3 * x**2 for x in jax.tree_util.tree_leaves(params)])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for _ in range(steps):
        params, state = step(params, state)
        m = so.get_metrics(state)
        history.append((
            [np.asarray(x) for x in jax.tree_util.tree_leaves(params)],
            {f: float(getattr(m, f)) for f in _METRIC_FIELDS}
            | {"numel": int(m.numel)},
            so.get_sketches(state) if sketch is not None else None))
    return history


def _compare(ours, theirs):
    for t, ((p_o, m_o, _), (p_t, m_t, _)) in enumerate(zip(ours, theirs)):
        for a, b in zip(p_o, p_t):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6,
                                       err_msg=f"params at step {t}")
        assert m_o["numel"] == m_t["numel"]
        for f in _METRIC_FIELDS:
            np.testing.assert_allclose(m_o[f], m_t[f], rtol=1e-4, atol=1e-6,
                                       err_msg=f"metric {f} at step {t}")


COMBOS = list(itertools.product([0.0, 0.05], [0.0, 2.0], [False, True],
                                [None, 0.05]))


@pytest.mark.parametrize("weight_decay,localization,use_mask,box", COMBOS)
@pytest.mark.parametrize("noise_level", [0.0, 1.0])
def test_matches_devinterp(weight_decay, localization, use_mask, box,
                           noise_level, monkeypatch):
    rng = np.random.default_rng(0)
    params = _random_params(rng)
    mask = _random_mask(rng) if use_mask else None
    hp = dict(lr=0.01, nbeta=7.5, noise_level=noise_level,
              weight_decay=weight_decay, localization=localization,
              bounding_box_size=box)
    key = jax.random.key(11)
    steps = 4
    noise = _oracle_noise(key, params, steps)
    theirs = _run_devinterp(params, mask, noise, hp, steps, monkeypatch)
    ours = _run_ours(params, mask, hp, steps, key)
    _compare(ours, theirs)
    # The chain moved, so the comparison is not vacuous.
    start = jax.tree_util.tree_leaves(params)
    assert max(np.abs(a - b).max() for a, b in zip(ours[-1][0], start)) > 1e-3


def test_sketches_match_devinterp(monkeypatch):
    rng = np.random.default_rng(1)
    params = _random_params(rng)
    mask = _random_mask(rng)
    total = sum(int(np.prod(s)) for s in SHAPES)
    ref = di_sketch.CountSketch.create(total, 8, seed=3)
    ours_cs = so.CountSketch.from_tables(ref.hash_indices.numpy(),
                                         ref.hash_signs.numpy(), 8)
    hp = dict(lr=0.01, nbeta=7.5, noise_level=1.0, weight_decay=0.05,
              localization=2.0, bounding_box_size=None)
    key = jax.random.key(5)
    noise = _oracle_noise(key, params, 3)
    theirs = _run_devinterp(params, mask, noise, hp, 3, monkeypatch, sketch=ref)
    ours = _run_ours(params, mask, hp, 3, key, sketch=ours_cs)
    _compare(ours, theirs)
    for (_, _, s_o), (_, _, s_t) in zip(ours, theirs):
        for field in so.SketchBuffer._fields:
            a = np.asarray(getattr(s_o, field))
            b = getattr(s_t, field).numpy()
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                       err_msg=field)
    # Every component is nonzero by the last step (w has left w0).
    assert all(np.abs(getattr(ours[-1][2], f)).max() > 0
               for f in so.SketchBuffer._fields)


def test_default_nbeta_matches_devinterp():
    import devinterp.utils as di_utils

    for m in (2, 7, 32, 64, 1000):
        for acc in (1, 3):
            assert so.default_nbeta(m, acc) == pytest.approx(
                di_utils.default_nbeta(m, acc), rel=1e-12)
