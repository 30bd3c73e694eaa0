"""Step-for-step tests against devinterp 2.0.1's torch `SGMCMC`.

`so.sgld` and `so.rmsprop_sgld` take the same steps as `SGMCMC.sgld` and
`SGMCMC.rmsprop_sgld` from the same params, gradients and noise: devinterp's
`torch.normal` is replaced by a queue holding the noise `sgld_optax` draws
(rebuilt from the state's key by the float64 reference of `sgld_testing`).
Params, `Metrics`, count sketches and RMSprop's running mean must then agree
to float32 rounding, except where the library documents a difference (under
a mask, `unscaled_grad` is masked here and not in devinterp). The options of
`rmsprop_sgld` that devinterp lacks (`initial_square_avg`,
`bias_correction`) are checked against a float64 NumPy oracle of the
documented update.
"""

import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgld_optax as so
from sgld_testing import count_sketch_reference
from sgld_testing import queue_torch_normal
from sgld_testing import reference_noise_schedule

torch = pytest.importorskip("torch")
di_sgmcmc = pytest.importorskip("devinterp.optim.sgmcmc")
ti = pytest.importorskip("sgld_optax.torch_interop")

SHAPES = {"a": (4, 5), "b": (7,)}  # 27 params in two leaves
LR = 0.01
NBETA = 7.5
STEPS = 5
SKETCH_DIM = 8
SKETCH_SEED = 3
NORMS = ("scaled_grad", "unscaled_grad", "localization", "weight_decay",
         "noise", "distance")
DOTS = {"dot_grad_prior": ("scaled_grad", "prior"),
        "dot_grad_noise": ("scaled_grad", "noise"),
        "dot_prior_noise": ("prior", "noise")}
SKETCHED = ("scaled_grad", "unscaled_grad", "localization", "weight_decay",
            "noise")


def _params():
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _mask():
    """A 0/1 float mask with zeros and ones in both leaves."""
    rng = np.random.default_rng(1)
    return {k: (rng.random(size=s) < 0.6).astype(np.float32)
            for k, s in SHAPES.items()}


def _grads(leaves, t):
    """The gradient of a fixed loss at step ``t``: it changes with the
    params and with the step (a different minibatch each step)."""
    return [(np.sin(x + 0.5 * t) + 0.3 * x**2).astype(x.dtype) for x in leaves]


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


# ---------------------------------------------------------------------------
# The two runs
# ---------------------------------------------------------------------------


def _build(factory, hp, mask, sketch, key):
    return factory(LR, nbeta=NBETA, mask=mask, save_metrics=True,
                   sketch=sketch, key=key, **hp)


def _devinterp_sketch(seed=SKETCH_SEED):
    total = sum(int(np.prod(s)) for s in SHAPES.values())
    return ti.devinterp_count_sketch(total, SKETCH_DIM, seed=seed)


def _literal_stepper(factory, hp, mask, sketch, key):
    """`init` and the jitted step of `factory` with literal hyperparameters."""
    tx = _build(factory, hp, mask, sketch, key)

    @jax.jit
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx.init, step


@functools.lru_cache(maxsize=None)
def _traced_step(method, use_mask, box):
    """The jitted step of one structure of sampler, mask and box.

    The scalar hyperparameters (`weight_decay`, `localization` and RMSprop's
    `alpha`, `eps`) are traced arguments, so the grid shares one compilation
    per structure.
    """
    factory = getattr(so, method)
    mask = _mask() if use_mask else None
    sketch = _devinterp_sketch()

    @jax.jit
    def step(grads, state, params, hp):
        tx = _build(factory, dict(hp, bounding_box_size=box), mask, sketch, 0)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _traced_stepper(method, hp, use_mask, key):
    """`init` and the step of `_traced_step` for the values in `hp`."""
    box = hp["bounding_box_size"]
    hp = dict(hp)
    if method == "rmsprop_sgld":
        # The defaults, traced too, so both RMSprop variants share a step.
        defaults = inspect.signature(so.rmsprop_sgld).parameters
        for name in ("alpha", "eps"):
            hp.setdefault(name, defaults[name].default)
    scalars = {k: jnp.float32(v) for k, v in hp.items()
               if k != "bounding_box_size"}
    tx = _build(getattr(so, method), dict(scalars, bounding_box_size=box),
                _mask() if use_mask else None, _devinterp_sketch(), key)
    step = _traced_step(method, use_mask, box)
    return tx.init, lambda grads, state, params: step(grads, state, params,
                                                      scalars)


def _run_ours(stepper, params):
    """Steps `(init, step)`; per step the params, metrics, sketches,
    square_avg (or None) and the gradient the step was given."""
    init, step = stepper
    params = jax.tree.map(jnp.asarray, params)
    treedef = jax.tree_util.tree_structure(params)
    state = init(params)
    history = []
    for t in range(STEPS):
        grads = _grads([np.asarray(x) for x in _leaves(params)], t)
        params, state = step(jax.tree_util.tree_unflatten(treedef, grads),
                             state, params)
        m = so.get_metrics(state)
        s = so.get_sketches(state)
        sq = getattr(state, "square_avg", None)
        history.append(dict(
            params=[np.asarray(x) for x in _leaves(params)],
            metrics={f: float(getattr(m, f)) for f in NORMS + tuple(DOTS)},
            numel=int(m.numel),
            sketch={f: np.asarray(getattr(s, f)) for f in SKETCHED},
            square_avg=(None if sq is None
                        else [np.asarray(x) for x in _leaves(sq)]),
            grads=grads))
    return history


def _run_devinterp(method, hp, params, mask, noise, monkeypatch):
    """Steps devinterp's `SGMCMC.<method>(**hp)` with the queued noise."""
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in _leaves(params)]
    tmask = (None if mask is None
             else [torch.tensor(m) for m in _leaves(mask)])
    opt = getattr(di_sgmcmc.SGMCMC, method)(
        tparams, lr=LR, nbeta=NBETA, mask=tmask, save_metrics=True,
        sketch_dim=SKETCH_DIM, sketch_seed=SKETCH_SEED, **hp)
    queue = queue_torch_normal(monkeypatch, di_sgmcmc.torch)
    history = []
    for t in range(STEPS):
        queue.extend(noise[t])
        grads = _grads([p.detach().numpy() for p in tparams], t)
        for p, g in zip(tparams, grads):
            p.grad = torch.tensor(g)
        opt.step()
        assert not queue  # one draw per leaf
        m = opt.get_metrics()
        s = opt.get_sketches()
        history.append(dict(
            params=[p.detach().numpy().copy() for p in tparams],
            metrics={f: float(getattr(m, f)) for f in NORMS + tuple(DOTS)},
            numel=m.numel,
            sketch={f: getattr(s, f).numpy().copy() for f in SKETCHED},
            square_avg=([opt.state[p]["square_avg"].numpy().copy()
                         for p in tparams]
                        if method == "rmsprop_sgld" else None)))
    monkeypatch.undo()
    return history


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------


def _norms_with_prior(metrics):
    out = dict(metrics)
    out["prior"] = np.hypot(metrics["localization"], metrics["weight_decay"])
    return out


def _assert_metrics_close(ours, theirs, fields, where):
    """Norms to rtol 1e-5; dot products to 1e-5 of the product of the
    two norms (a dot of float32 vectors is exact only to that scale)."""
    norms = _norms_with_prior(theirs)
    for f in fields:
        if f in DOTS:
            a, b = DOTS[f]
            atol = 1e-5 * norms[a] * norms[b] + 1e-9
            np.testing.assert_allclose(ours[f], theirs[f], rtol=1e-5,
                                       atol=atol, err_msg=f"{f} {where}")
        else:
            np.testing.assert_allclose(ours[f], theirs[f], rtol=1e-5,
                                       atol=1e-8, err_msg=f"{f} {where}")


def _assert_sketch_close(ours, theirs, norm, where):
    """A bucket sums float32 terms of a vector of L2 norm `norm`."""
    np.testing.assert_allclose(ours, theirs, rtol=1e-5,
                               atol=1e-6 * norm + 1e-9, err_msg=where)


def _compare(ours, theirs, start, mask, sketch):
    """Everything agrees, but for the documented masked `unscaled_grad`.

    `start` holds the initial params $w_0$ (leaves).
    """
    masked = mask is not None
    m_leaves = _leaves(mask) if masked else None
    total = sum(int(np.prod(s)) for s in SHAPES.values())
    idx, sgn = np.asarray(sketch.hash_indices), np.asarray(sketch.hash_signs)
    for t, (o, d) in enumerate(zip(ours, theirs)):
        where = f"at step {t}"
        for a, b in zip(o["params"], d["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                       err_msg=f"params {where}")
        if d["square_avg"] is not None:
            for a, b in zip(o["square_avg"], d["square_avg"]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8,
                                           err_msg=f"square_avg {where}")
        # devinterp counts the nonzero mask entries, as do we.
        expected_numel = (total if not masked
                          else int(sum(np.count_nonzero(m) for m in m_leaves)))
        assert o["numel"] == d["numel"] == expected_numel

        fields = [f for f in NORMS + tuple(DOTS)
                  if not (masked and f == "unscaled_grad")]
        _assert_metrics_close(o["metrics"], d["metrics"], fields, where)
        for f in SKETCHED:
            if masked and f == "unscaled_grad":
                continue
            _assert_sketch_close(o["sketch"][f], d["sketch"][f],
                                 d["metrics"][f], f"sketch {f} {where}")

        # distance = |w - w0| before the step: ours masked, devinterp's not.
        # The two agree (masked entries never leave w0), as checked above.
        pre = start if t == 0 else ours[t - 1]["params"]
        disp = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
                for a, b in zip(pre, start)]
        ms = m_leaves if masked else [1.0] * len(disp)
        np.testing.assert_allclose(
            o["metrics"]["distance"],
            np.sqrt(sum(np.sum((m * x)**2) for m, x in zip(ms, disp))),
            rtol=1e-5, atol=1e-8, err_msg=f"distance {where}")
        np.testing.assert_allclose(
            d["metrics"]["distance"],
            np.sqrt(sum(np.sum(x**2) for x in disp)),
            rtol=1e-5, atol=1e-8, err_msg=f"devinterp distance {where}")

        # unscaled_grad = (eps/2) nbeta g: ours masked, devinterp's not.
        vec = [0.5 * LR * NBETA * np.asarray(g, np.float64) for g in o["grads"]]
        if masked:
            vec_m = [v * m for v, m in zip(vec, m_leaves)]
            full = np.sqrt(sum(np.sum(v**2) for v in vec))
            part = np.sqrt(sum(np.sum(v**2) for v in vec_m))
            assert part < 0.99 * full  # the two conventions differ here
            np.testing.assert_allclose(o["metrics"]["unscaled_grad"], part,
                                       rtol=1e-5)
            np.testing.assert_allclose(d["metrics"]["unscaled_grad"], full,
                                       rtol=1e-5)
            _assert_sketch_close(
                o["sketch"]["unscaled_grad"],
                count_sketch_reference(idx, sgn, SKETCH_DIM, vec_m), part,
                f"masked unscaled_grad sketch {where}")
            _assert_sketch_close(
                d["sketch"]["unscaled_grad"],
                count_sketch_reference(idx, sgn, SKETCH_DIM, vec), full,
                f"devinterp unscaled_grad sketch {where}")


# ---------------------------------------------------------------------------
# SGLD and RMSprop-SGLD against SGMCMC
# ---------------------------------------------------------------------------

GRID = list(itertools.product([0.0, 0.1], [0.0, 5.0], [False, True],
                              [None, 0.05]))
SAMPLERS = {
    "sgld": ("sgld", {}),
    "rmsprop_sgld": ("rmsprop_sgld", {}),
    "rmsprop_sgld_alpha_eps": ("rmsprop_sgld", {"alpha": 0.9, "eps": 0.03}),
}


def _check_against_sgmcmc(method, hp, use_mask, traced, monkeypatch):
    params = _params()
    mask = _mask() if use_mask else None
    key = jax.random.key(11)
    noise = reference_noise_schedule(key, _leaves(params), STEPS)
    theirs = _run_devinterp(method, hp, params, mask, noise, monkeypatch)
    sketch = _devinterp_sketch()
    stepper = (_traced_stepper(method, hp, use_mask, key) if traced
               else _literal_stepper(getattr(so, method), hp, mask, sketch,
                                     key))
    ours = _run_ours(stepper, params)
    _compare(ours, theirs, _leaves(params), mask, sketch)

    # The comparison is not vacuous: the chain moved, masked entries stayed,
    # the box bound and every active component is nonzero.
    start, end = _leaves(params), ours[-1]["params"]
    assert max(np.abs(a - b).max() for a, b in zip(end, start)) > 1e-2
    if use_mask:
        for a, b, m in zip(end, start, _leaves(mask)):
            np.testing.assert_array_equal(a[m == 0], b[m == 0])
    box = hp["bounding_box_size"]
    if box is not None:
        assert any(np.isclose(np.abs(a - b), box, rtol=1e-4, atol=0).any()
                   for a, b in zip(end, start))
    last = ours[-1]["metrics"]
    active = {"localization": hp["localization"],
              "weight_decay": hp["weight_decay"]}
    for f in NORMS:
        assert (last[f] > 0) == bool(active.get(f, 1.0)), f
    if method == "rmsprop_sgld":
        # The preconditioner is far from 1, so this is not SGLD.
        assert not np.isclose(last["scaled_grad"], last["unscaled_grad"],
                              rtol=0.1)


@pytest.mark.parametrize("weight_decay,localization,use_mask,box", GRID)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_matches_sgmcmc(sampler, weight_decay, localization, use_mask, box,
                        monkeypatch):
    """The grid, with the scalar hyperparameters traced (one compilation
    per sampler, mask and box)."""
    method, extra = SAMPLERS[sampler]
    hp = dict(weight_decay=weight_decay, localization=localization,
              bounding_box_size=box, **extra)
    _check_against_sgmcmc(method, hp, use_mask, True, monkeypatch)


@pytest.mark.parametrize("sampler,weight_decay,localization,use_mask,box", [
    ("sgld", 0.0, 0.0, True, 0.05),
    ("rmsprop_sgld", 0.0, 0.0, True, 0.05),
    ("sgld", 0.1, 5.0, False, None),
    ("rmsprop_sgld_alpha_eps", 0.1, 5.0, True, None),
])
def test_matches_sgmcmc_literal(sampler, weight_decay, localization, use_mask,
                                box, monkeypatch):
    """Literal hyperparameters, as usually written: priors of precision 0
    are left out of the step, and the rest are constants."""
    method, extra = SAMPLERS[sampler]
    hp = dict(weight_decay=weight_decay, localization=localization,
              bounding_box_size=box, **extra)
    _check_against_sgmcmc(method, hp, use_mask, False, monkeypatch)


# ---------------------------------------------------------------------------
# RMSprop options beyond devinterp, against a float64 oracle
# ---------------------------------------------------------------------------


def _rmsprop_oracle(params, mask, noise, *, alpha, eps, v0, bias_correction,
                    weight_decay, localization, box):
    """The documented RMSprop-SGLD update in float64, with the given noise.

    $V_t = a V_{t-1} + (1-a) g^2$ from $V_0 = v_0$,
    $\\hat V_t = V_t / (1 - a^t)$ with bias correction,
    $G = 1/(\\sqrt{\\hat V_t} + \\varepsilon)$, the drift times $G$ and the
    noise times $\\sqrt G$, everything masked, then the box.
    """
    w0 = [np.asarray(x, np.float64) for x in _leaves(params)]
    ms = ([np.asarray(m, np.float64) for m in _leaves(mask)]
          if mask is not None else [np.ones_like(x) for x in w0])
    w = [x.copy() for x in w0]
    v = [np.full_like(x, v0) for x in w0]
    history = []
    for t in range(STEPS):
        grads = [np.sin(x + 0.5 * t) + 0.3 * x**2 for x in w]
        comps = {f: [] for f in ("scaled_grad", "unscaled_grad",
                                 "localization", "weight_decay", "noise",
                                 "distance")}
        new_w, new_v = [], []
        for x, x0, m, g, vi, eta in zip(w, w0, ms, grads, v, noise[t]):
            vi = alpha * vi + (1 - alpha) * g * g
            v_hat = vi / (1 - alpha ** (t + 1)) if bias_correction else vi
            G = 1 / (np.sqrt(v_hat) + eps)
            sg = 0.5 * LR * NBETA * m * G * g
            loc = 0.5 * LR * localization * m * G * (x - x0)
            wd = 0.5 * LR * weight_decay * m * G * x
            xi = np.sqrt(LR) * m * np.sqrt(G) * np.asarray(eta, np.float64)
            y = x - (sg + loc + wd) + xi
            if box is not None:
                y = np.clip(y, x0 - box, x0 + box)
            for f, c in (("scaled_grad", sg),
                         ("unscaled_grad", 0.5 * LR * NBETA * m * g),
                         ("localization", loc), ("weight_decay", wd),
                         ("noise", xi), ("distance", m * (x - x0))):
                comps[f].append(c.reshape(-1))
            new_w.append(y)
            new_v.append(vi)
        w, v = new_w, new_v
        c = {f: np.concatenate(x) for f, x in comps.items()}
        prior = c["localization"] + c["weight_decay"]
        metrics = {f: np.linalg.norm(c[f]) for f in NORMS}
        metrics["dot_grad_prior"] = c["scaled_grad"] @ prior
        metrics["dot_grad_noise"] = c["scaled_grad"] @ c["noise"]
        metrics["dot_prior_noise"] = prior @ c["noise"]
        history.append(dict(params=w, square_avg=v, metrics=metrics))
    return history


@pytest.mark.parametrize(
    "v0,bias_correction,weight_decay,localization,use_mask,box",
    [(0.5, False, 0.1, 5.0, True, None),
     (0.0, True, 0.1, 5.0, True, None),
     (0.5, True, 0.1, 5.0, True, None),
     (0.5, True, 0.0, 5.0, False, 0.05)])
def test_rmsprop_options_match_oracle(v0, bias_correction, weight_decay,
                                      localization, use_mask, box):
    alpha, eps = 0.9, 0.05
    params = _params()
    mask = _mask() if use_mask else None
    key = jax.random.key(7)
    noise = reference_noise_schedule(key, _leaves(params), STEPS)
    hp = dict(alpha=alpha, eps=eps, initial_square_avg=v0,
              bias_correction=bias_correction, weight_decay=weight_decay,
              localization=localization, bounding_box_size=box)
    ours = _run_ours(_literal_stepper(so.rmsprop_sgld, hp, mask,
                                      _devinterp_sketch(), key), params)
    oracle = _rmsprop_oracle(params, mask, noise, alpha=alpha, eps=eps, v0=v0,
                             bias_correction=bias_correction,
                             weight_decay=weight_decay,
                             localization=localization, box=box)
    for t, (o, r) in enumerate(zip(ours, oracle)):
        where = f"at step {t}"
        for a, b in zip(o["params"], r["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                       err_msg=f"params {where}")
        for a, b in zip(o["square_avg"], r["square_avg"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8,
                                       err_msg=f"square_avg {where}")
        _assert_metrics_close(o["metrics"], r["metrics"],
                              NORMS + tuple(DOTS), where)
    # The options matter: devinterp's update (V_0 = 0, no correction) moves
    # the chain elsewhere from the first step on.
    plain = _rmsprop_oracle(params, mask, noise, alpha=alpha, eps=eps, v0=0.0,
                            bias_correction=False, weight_decay=weight_decay,
                            localization=localization, box=box)
    assert max(np.abs(a - b).max() for a, b in
               zip(ours[0]["params"], plain[0]["params"])) > 1e-3
