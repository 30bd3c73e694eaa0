r"""The compiled sampling loop of `estimate_llc`: every chain of a run in one program.

All chains run together: one chain's step is the sampler's `update`
followed by `optax.apply_updates`, `jax.vmap` runs every chain at once, and
one `lax.scan` over steps makes the whole run one compiled program
(in-memory data), or one compiled step is fed batches from the host
(a loader). The program is cached on the loss function, shapes, the sampler
and structural settings (`_Static`); the key and the numeric
hyperparameters (`_Hyper`) are traced arguments, so a sweep over them
compiles once.

The loop also watches every chain at every step (burn-in included): the
first step whose loss is non-finite, or finite but above the blow-up bound
(`blowup_bound`), is kept per chain with its kind and loss, and, when asked,
the Metropolis-adjusted Langevin (MALA) acceptance probability of each step
is computed from the losses and gradients the steps compute anyway
(`_log_acceptance`). Everything a run returns is a plain array of the
compiled program's outputs (`_Outputs`); `_run_in_memory` is the program
without `jax.jit`, a pure function of `(static, hyper, ...)` when
`static.progress` is off.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import io_callback

from sgld_optax._src import base
from sgld_optax._src import noise as noise_lib
from sgld_optax._src.core import terms as terms_lib
from sgld_optax._src.samplers import common as common_lib
from sgld_optax._src.samplers import rmsprop_sgld as rmsprop_sgld_lib
from sgld_optax._src.samplers import sghmc as sghmc_lib
from sgld_optax._src.samplers import sgld as sgld_lib
from sgld_optax._src.samplers import sgnht as sgnht_lib


from sgld_optax._src.llc.data import (
    _batches,
    _check_loss,
    _dataset_loss,
    _leading_size,
    _nonfinite_rows,
    _to_numpy,
    nonfinite_init_loss_error,
    shuffled_index)


# Number of progress-bar updates over a run: few enough to cost nothing.
_PROGRESS_UPDATES = 20


# ---------------------------------------------------------------------------
# Argument handling.


# The samplers `estimate_llc` runs by name.
_SAMPLERS = {
    "sgld": sgld_lib.sgld,
    "rmsprop_sgld": rmsprop_sgld_lib.rmsprop_sgld,
    "sghmc": sghmc_lib.sghmc,
    "sgnht": sgnht_lib.sgnht,
}

# The sampler arguments `estimate_llc` sets itself.
_OWN_ARGS = ("learning_rate", "nbeta", "noise_level", "weight_decay",
             "localization", "bounding_box_size", "mask", "save_metrics",
             "key")


class _Hyper(NamedTuple):
    """Numeric hyperparameters, traced (float32 scalars) in the compiled loop."""

    learning_rate: Any
    nbeta: Any
    localization: Any
    weight_decay: Any
    noise_level: Any
    bounding_box_size: Any
    sampler_options: dict  # the float entries of sampler_kwargs


class _Static(NamedTuple):
    """Everything the compiled loop is specialised on (hashable)."""

    loss_fn: Callable
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    num_steps_bw_draws: int
    batch_size: int
    save_metrics: bool
    progress: bool
    lr_schedule: Optional[Callable]
    use_box: bool
    sharding: Any
    sampler: Callable            # the sampler's factory
    sampler_options: tuple       # sorted (name, value) pairs of the other
                                 # entries of sampler_kwargs
    mala: bool = False           # record the MALA acceptance of each step

    @property
    def num_steps(self) -> int:
        """Steps per chain: burn-in, then the draws."""
        return self.num_burnin_steps + self.num_draws * self.num_steps_bw_draws


def _is_float(value) -> bool:
    """Whether `value` is a real floating-point scalar (traced when given
    as a sampler option)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (float, np.floating)):
        return True
    return (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
            and jnp.issubdtype(value.dtype, jnp.floating))


def _resolve_sampler(sampler, sampler_kwargs):
    """The factory, static options and traced options of `sampler`.

    Returns:
      `(factory, static_options, traced_options)`: the sampler's factory,
      a sorted tuple of `(name, value)` pairs of the options the program
      is specialised on, and a dict of the float options, as float32.
    """
    if isinstance(sampler, str):
        if sampler not in _SAMPLERS:
            names = ", ".join(repr(k) for k in _SAMPLERS)
            raise ValueError(
                f"sampler must be one of {names} or a sampler factory, got "
                f"{sampler!r}.")
        factory = _SAMPLERS[sampler]
    elif callable(sampler):
        factory = sampler
    else:
        raise TypeError(
            "sampler must be a name (" + ", ".join(repr(k) for k in _SAMPLERS)
            + f") or a sampler factory such as so.sghmc, got {sampler!r}.")
    if sampler_kwargs is None:
        sampler_kwargs = {}
    if not isinstance(sampler_kwargs, Mapping):
        raise TypeError(
            f"sampler_kwargs must be a dict, got {sampler_kwargs!r}.")
    static, traced = [], {}
    for name, value in sampler_kwargs.items():
        if not isinstance(name, str):
            raise TypeError(
                f"sampler_kwargs keys must be strings, got {name!r}.")
        if name in _OWN_ARGS:
            raise ValueError(
                f"sampler_kwargs[{name!r}]: {name} is an argument of "
                f"estimate_llc; pass {name}= to estimate_llc instead.")
        if _is_float(value):
            traced[name] = np.float32(value)
            continue
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"sampler_kwargs[{name!r}] must be a float (an argument of "
                "the compiled program) or hashable (part of its cache key), "
                f"got {value!r}.") from None
        static.append((name, value))
    return factory, tuple(sorted(static)), traced


def _chain_sharding(num_chains: int):
    """A sharding of the chain axis over as many devices as divide it."""
    devices = jax.devices()
    count = max(k for k in range(1, len(devices) + 1) if num_chains % k == 0)
    if count == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices[:count]), ("chains",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("chains"))


# ---------------------------------------------------------------------------
# Failure detection.

# The kinds of failure, as int32 codes in the loop.
NO_FAILURE, NON_FINITE, BLOW_UP = 0, 1, 2

# The blow-up bound: see `blowup_bound` and docs/trust.md.
BLOWUP_PER_PARAM = 100.0
BLOWUP_SPREADS = 10.0


class _Reference(NamedTuple):
    """What every step's loss is compared with (traced float32 scalars)."""

    init_loss: Any   # L_n(w*)
    spread: Any      # the largest |batch loss - L_n(w*)| over the batches
                     # L_n(w*) was computed from
    num_params: Any  # d, the number of sampled parameters


def blowup_bound(reference: _Reference, nbeta):
    r"""The loss above which a finite loss is a blow-up.

    $$
    L_n(w^*) + \frac{100\,(d + 1)}{n\beta} + 10\, s,
    $$

    with $d$ the number of sampled parameters and $s$ the largest
    deviation $|L_B(w^*) - L_n(w^*)|$ of a batch's loss from the mean
    over the batches $L_n(w^*)$ was computed from. In tempered units, a
    loss above it has $n\beta\,(L_t - L_n(w^*)) > 100\,(d + 1) + 10\,
    n\beta\, s$: at least 200 times the largest possible LLC, $d/2$, above
    the minimum, beyond ten times the widest minibatch noise seen at $w^*$.
    """
    return (reference.init_loss
            + BLOWUP_PER_PARAM * (reference.num_params + 1.0) / nbeta
            + BLOWUP_SPREADS * reference.spread)


# ---------------------------------------------------------------------------
# MALA acceptance of a Langevin step.


class _MalaCarry(NamedTuple):
    """The last step, as the next one needs it for the step's MALA
    acceptance; leaf lists in the flatten order of the params."""

    delta: list      # w_{t+1} - w_t, the update (masked)
    drift: list      # grad U(w_t) on batch B_t (masked)
    precond: Any     # G_t per leaf (RMSprop), or None (SGLD: G = 1)
    loss: Any        # L_{B_t}(w_t), float32
    prior: Any       # the priors' part of U(w_t), float32
    lr: Any          # the step size of step t, float32
    valid: Any       # bool: whether there was a step before


def _hyperparams(tx):
    return tx.update.hyperparams


def _potential(tx, state, params, grads, w_star, mask):
    r"""The drift $\nabla U(w)$ (masked, per leaf) and the priors' part of
    $U(w)$, where $U(w) = n\beta L_B(w) + \sum_k \tfrac{\gamma_k}{2}
    \|m \odot (w - c_k)\|^2$ is the potential the sampler's step follows."""
    hp = _hyperparams(tx)
    nb = base.value_at(hp["nbeta"], state.count)
    priors = terms_lib.priors_of(hp["localization"], hp["weight_decay"],
                                 list(hp["priors"]))
    terms = terms_lib.drift_terms(nb, priors)
    centers = terms_lib.given_centers(priors)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    m_leaves = (treedef.flatten_up_to(mask) if mask is not None
                else [None] * len(p_leaves))
    w0_leaves = treedef.flatten_up_to(w_star)
    c_leaves = [treedef.flatten_up_to(c) for c in centers]
    drift, prior = [], jnp.zeros((), jnp.float32)
    for i, p in enumerate(p_leaves):
        cd = base.compute_dtype(p.dtype)
        w, g = p.astype(cd), g_leaves[i].astype(cd)
        m = None if m_leaves[i] is None else jnp.asarray(m_leaves[i]).astype(cd)
        total = None
        for t in terms:
            b = terms_lib.base_vector(t.base, w, g, w0_leaves[i],
                                      [c[i] for c in c_leaves])
            coef = jnp.asarray(t.coef, cd)
            total = coef * b if total is None else total + coef * b
            if t.base != terms_lib.GRAD:
                sq = b * b if m is None else m * b * b
                prior = prior + (0.5 * coef * jnp.sum(sq)).astype(jnp.float32)
        drift.append(total if m is None else total * m)
    return drift, prior


def _preconditioner(tx, state, params, grads):
    """The diagonal preconditioner $G_t$ of the step from `state`, per
    leaf, or `None` for a sampler without one (SGLD)."""
    precond = tx.update.preconditioner
    if not precond.fields:
        return None
    treedef = jax.tree_util.tree_structure(params)
    _, factors = precond.update(
        {f: treedef.flatten_up_to(getattr(state, f)) for f in precond.fields},
        treedef.flatten_up_to(grads), state.count)
    return list(factors.drift)


def _log_acceptance(prev: _MalaCarry, nbeta, drift, loss, prior):
    r"""$\log$ of the MALA acceptance ratio of the step `prev` describes.

    With $a = w_t$, $b = w_{t+1}$, $\delta = b - a$, drifts $g_a =
    \nabla U(a)$, $g_b = \nabla U(b)$, step size $\epsilon$ and
    preconditioner $G$ (held at the step's value in both directions), the
    Gaussian proposal $q(x \to y) = N(y;\, x - \tfrac{\epsilon}{2} G g_x,\,
    \epsilon G)$ gives

    $$
    \log\frac{e^{-U(b)}\, q(b \to a)}{e^{-U(a)}\, q(a \to b)}
    = U(a) - U(b) + \sum_i (g_a + g_b)_i
      \left[\frac{\delta_i}{2} - \frac{\epsilon G_i}{8} (g_b - g_a)_i\right],
    $$

    the same number as the difference of the two Gaussian log densities,
    written without their large, cancelling terms.
    """
    total = jnp.zeros((), jnp.float32)
    for i, gb in enumerate(drift):
        cd = gb.dtype
        ga = prev.drift[i]
        delta = prev.delta[i].astype(cd)
        quarter = jnp.asarray(prev.lr, cd) * 0.125
        if prev.precond is not None:
            quarter = quarter * prev.precond[i]
        total = total + jnp.sum(
            (ga + gb) * (0.5 * delta - quarter * (gb - ga))).astype(jnp.float32)
    return (jnp.asarray(nbeta, jnp.float32) * (prev.loss - loss)
            + (prev.prior - prior) + total)


def _mala_init(tx, params) -> _MalaCarry:
    leaves = jax.tree_util.tree_leaves(params)
    zeros = [jnp.zeros(p.shape, base.compute_dtype(p.dtype)) for p in leaves]
    f32 = jnp.zeros((), jnp.float32)
    return _MalaCarry(
        delta=[jnp.zeros_like(p) for p in leaves], drift=zeros,
        precond=([jnp.ones_like(z) for z in zeros]
                 if tx.update.preconditioner.fields else None),
        loss=f32, prior=f32, lr=f32, valid=jnp.zeros((), bool))


# ---------------------------------------------------------------------------
# One step of every chain.


class _Chains(NamedTuple):
    """The carry of the sampling loop; every field has a leading chain axis."""

    params: Any          # the params (a pytree, or one flat vector: see
                         # _flat), with a leading chain axis
    opt_state: Any       # the sampler's state (SGLDState, RMSpropSGLDState,
                         # SGHMCState or SGNHTState, with its square_avg,
                         # momentum or thermostat), vmapped, without
                         # initial_params: every chain starts at the same
                         # w*, kept once (_step_all)
    data_key: jax.Array  # typed PRNG key per chain, for minibatch order
    failure: jax.Array   # int32: NO_FAILURE, NON_FINITE or BLOW_UP, the
                         # first failure of the chain
    failure_step: jax.Array  # int32: the step it happened at (-1 if none)
    failure_loss: jax.Array  # float32: the loss at that step
    mala: Optional[_MalaCarry]  # with static.mala, the last step


class _Outputs(NamedTuple):
    """What a run returns, per chain; plain arrays with a leading chain axis.

    Attributes:
      losses: float32 `(num_chains, num_draws)`, the minibatch loss at each
        draw, before that draw's step.
      failure: int32 `(num_chains,)`: `NO_FAILURE`, `NON_FINITE` or
        `BLOW_UP`, the first failure of each chain.
      failure_step: int32 `(num_chains,)`, the step (counted from 0 over
        every step, burn-in included) of that failure, -1 where none.
      failure_loss: float32 `(num_chains,)`, the loss at that step.
      mala: float32 `(num_chains, num_draws)`, the MALA acceptance
        probability of the step taken from each draw, or `None`.
      metrics: `Metrics` of `(num_chains, num_steps)` traces, or `None`.
    """

    losses: Any
    failure: Any
    failure_step: Any
    failure_loss: Any
    mala: Any
    metrics: Any


def _sampler(static: _Static, hyper: _Hyper, mask):
    """The sampler's transformation with traced hyperparameters."""
    lr = static.lr_schedule if static.lr_schedule is not None else (
        hyper.learning_rate)
    return static.sampler(
        lr,
        nbeta=hyper.nbeta,
        noise_level=hyper.noise_level,
        weight_decay=hyper.weight_decay,
        localization=hyper.localization,
        bounding_box_size=hyper.bounding_box_size if static.use_box else None,
        mask=mask,
        save_metrics=static.save_metrics,
        key=0,  # replaced per chain in _init_chains
        **dict(static.sampler_options),
        **hyper.sampler_options,
    )


def _constrain(tree, sharding):
    if sharding is None:
        return tree
    return jax.tree.map(
        lambda x: lax.with_sharding_constraint(x, sharding), tree)


def _init_chains(static, hyper, mask, params, key, chain_ids):
    tx = _sampler(static, hyper, mask)
    state = tx.init(params)

    def one(i):
        sampler_key, data_key = jax.random.split(jax.random.fold_in(key, i))
        # Every field of the state is broadcast to a per-chain copy.
        return _Chains(params=params,
                       opt_state=state._replace(key=sampler_key,
                                                initial_params=None),
                       data_key=data_key,
                       failure=jnp.int32(NO_FAILURE),
                       failure_step=jnp.int32(-1),
                       failure_loss=jnp.float32(jnp.nan),
                       mala=_mala_init(tx, params) if static.mala else None)

    return tx, _constrain(jax.vmap(one)(chain_ids), static.sharding)


def _step_all(static, hyper, tx, chains: _Chains, w_star, mask, reference,
              batches, t, batch_axis=0):
    """Steps every chain on its own batch (leading chain axis), or on one
    shared batch when `batch_axis` is `None`; `t` is the step's index.

    The chains' initial params are all `w_star`: it is given to each
    chain's sampler state for the step, unbatched, rather than stored once
    per chain. (The localization is traced, so the sampler always keeps
    `initial_params`.) A chain's first non-finite loss, or first finite
    loss above `blowup_bound`, is kept with its step; steps from
    `static.num_steps` on (the extra step that gives the last draw's MALA
    acceptance) are not watched.

    Returns:
      The chains, and per chain the float32 loss before the step, the
      metrics (or `None`) and, with `static.mala`, the MALA acceptance
      probability of the chain's previous step (NaN at the first step).
    """
    bound = blowup_bound(reference, jnp.asarray(hyper.nbeta, jnp.float32))
    live = t < static.num_steps

    def one(c: _Chains, batch):
        state = c.opt_state._replace(initial_params=w_star)
        loss, grads = jax.value_and_grad(static.loss_fn)(c.params, batch)
        updates, new_state = tx.update(grads, state, c.params)
        params = optax.apply_updates(c.params, updates)
        new_state = new_state._replace(initial_params=None)
        metrics = (common_lib.get_metrics(new_state) if static.save_metrics
                   else None)
        value = loss.astype(jnp.float32)
        kind = jnp.where(~jnp.isfinite(value), NON_FINITE,
                         jnp.where(value > bound, BLOW_UP, NO_FAILURE))
        first = live & (c.failure == NO_FAILURE) & (kind != NO_FAILURE)
        accept, mala = None, c.mala
        if static.mala:
            drift, prior = _potential(tx, state, c.params, grads, w_star, mask)
            nb = base.value_at(_hyperparams(tx)["nbeta"], state.count)
            log_ratio = _log_acceptance(c.mala, nb, drift, value, prior)
            accept = jnp.where(c.mala.valid & jnp.isfinite(value),
                               jnp.exp(jnp.minimum(log_ratio, 0.0)), jnp.nan)
            lr = base.value_at(_hyperparams(tx)["learning_rate"], state.count)
            mala = _MalaCarry(
                delta=jax.tree_util.tree_leaves(updates), drift=drift,
                precond=_preconditioner(tx, state, c.params, grads),
                loss=value, prior=prior, lr=jnp.asarray(lr, jnp.float32),
                valid=jnp.ones((), bool))
        c = c._replace(
            params=params, opt_state=new_state,
            failure=jnp.where(first, kind, c.failure),
            failure_step=jnp.where(first, jnp.asarray(t, jnp.int32),
                                   c.failure_step),
            failure_loss=jnp.where(first, value, c.failure_loss),
            mala=mala)
        return c, (value, metrics, accept)

    step = jax.vmap(one, in_axes=(0, batch_axis))
    chains, out = step(chains, batches)
    return _constrain(chains, static.sharding), out


# ---------------------------------------------------------------------------
# Sampling from in-memory data: the whole run is one compiled program.

_progress_lock = threading.Lock()
_progress_bars: dict[int, Any] = {}
_run_ids = itertools.count()


def _report_progress(run_id, done):
    with _progress_lock:
        bar = _progress_bars.get(int(run_id))
    if bar is not None:
        done = int(done)
        if done > bar.n:
            bar.update(done - bar.n)


def _jit(**jit_kwargs):
    """`jax.jit` with `jit_kwargs`, as a decorator."""
    return functools.partial(jax.jit, **jit_kwargs)


def _reference_loss(loss_fn, params, data, chunk):
    """`(L_n(w*), spread, first non-finite chunk)` over in-memory data."""
    return _dataset_loss(loss_fn, params, data, chunk)


_reference_in_memory = jax.jit(_reference_loss,
                               static_argnames=("loss_fn", "chunk"))


def _draws(static: _Static, per_step):
    """The draws' entries of a per-step array (step axis first)."""
    return per_step[static.num_burnin_steps:static.num_steps:
                    static.num_steps_bw_draws]


def _run_in_memory(static: _Static, hyper: _Hyper, mask, params, data, key,
                   chain_ids, reference: _Reference, run_id) -> _Outputs:
    """Every chain of a run over in-memory `data`: the compiled program of
    `_sample_in_memory`, before `jax.jit`.

    A pure function of its arguments when `static.progress` is off (the
    progress bar is fed by a host callback), so that it can be vmapped
    over hyperparameters.
    """
    n = _leading_size(data)
    bs = static.batch_size
    steps_per_epoch = n // bs
    static, mask, params = _flat(static, mask, params)
    tx, chains = _init_chains(static, hyper, mask, params, key, chain_ids)

    def step(chains: _Chains, t):
        if bs == n:
            # Full-batch steps: the order of the examples does not matter.
            return _step_all(static, hyper, tx, chains, params, mask,
                             reference, data, t, batch_axis=None)
        epoch, pos = t // steps_per_epoch, t % steps_per_epoch
        # Each chain goes through its own random permutation of the data,
        # a new one every epoch, batch_size examples per step.
        positions = pos * bs + jnp.arange(bs, dtype=jnp.int32)
        index = jax.vmap(lambda k: shuffled_index(
            noise_lib.fold_in(k, epoch), positions, n))(chains.data_key)
        batches = jax.tree.map(lambda x: jnp.take(x, index, axis=0), data)
        return _step_all(static, hyper, tx, chains, params, mask, reference,
                         batches, t)

    burnin, every = static.num_burnin_steps, static.num_steps_bw_draws
    num_draws, num_steps = static.num_draws, static.num_steps
    report_every = max(1, math.ceil(num_draws / _PROGRESS_UPDATES))

    def step_and_report(chains, t):
        out = step(chains, t)
        if static.progress:
            done = (t - burnin) // every + 1
            lax.cond(
                (t >= burnin) & (t < num_steps) & ((t - burnin) % every == 0)
                & ((done % report_every == 0) | (done == num_draws)),
                lambda: io_callback(_report_progress, None, run_id, done),
                lambda: None)
        return out

    # One scan over every step keeps a single compiled copy of the step; the
    # draws are then read off the per-step outputs. With MALA one more step
    # gives the gradient at the last step's end point.
    length = num_steps + (1 if static.mala else 0)
    chains, (losses, metrics, accept) = lax.scan(
        step_and_report, chains, jnp.arange(length, dtype=jnp.int32))
    mala = None
    if static.mala:
        # accept[t] is the acceptance of step t - 1.
        mala = _draws(static, accept[1:]).T
    metrics = jax.tree.map(lambda x: x[:num_steps].T, metrics)
    return _Outputs(losses=_draws(static, losses).T, failure=chains.failure,
                    failure_step=chains.failure_step,
                    failure_loss=chains.failure_loss, mala=mala,
                    metrics=metrics)


_sample_in_memory = jax.jit(_run_in_memory, static_argnames=("static",))


def _flat(static: _Static, mask, params):
    """The sampling problem over one flat parameter vector, where possible.

    When every leaf of `params` has the same dtype, the chains carry the
    params as one flat vector and `loss_fn` sees them unflattened: the
    sampler then updates, and draws noise for, one array instead of one per
    leaf, which compiles faster and launches fewer kernels per step. The
    step is the same elementwise rule; the noise is drawn for the flat
    vector. Returns `(static, mask, params)` for the sampler.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if len(leaves) < 2 or len({jnp.result_type(x) for x in leaves}) != 1:
        return static, mask, params
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss_fn = static.loss_fn
    static = static._replace(loss_fn=lambda w, batch: loss_fn(unravel(w), batch))
    if mask is not None:
        mask = jax.flatten_util.ravel_pytree(mask)[0]
    return static, mask, flat


# ---------------------------------------------------------------------------
# Sampling from an iterable of batches: one compiled step, fed from the host.


@_jit(static_argnames=("static",))
def _init_streamed(static, hyper, mask, params, key, chain_ids):
    static, mask, params = _flat(static, mask, params)
    return _init_chains(static, hyper, mask, params, key, chain_ids)[1]


@_jit(static_argnames=("static",), donate_argnums=(3,))
def _step_streamed(static, hyper, mask, chains, params, reference, batches, t):
    static, mask, params = _flat(static, mask, params)
    return _step_all(static, hyper, _sampler(static, hyper, mask), chains,
                     params, mask, reference, batches, t)


@_jit(static_argnames=("loss_fn",))
def _batch_loss(loss_fn, params, batch):
    return loss_fn(params, batch).astype(jnp.float32)


def _stream_init_loss(loss_fn, params, data) -> tuple[float, float]:
    """`(L_n(w*), spread)` over one pass of `data`.

    Raises:
      ValueError: when a batch's loss is non-finite (naming the batch and
        its non-finite rows), or when `data` yields no batches.
    """
    losses, sizes = [], []
    for i, batch in enumerate(data):
        batch = jax.tree.map(_to_numpy, batch)
        size = _leading_size(batch, "a batch of data")
        value = float(_batch_loss(loss_fn, params, batch))
        if not math.isfinite(value):
            raise nonfinite_init_loss_error(
                value, params=params,
                where=f"batch {i} of data (counting from 0, in the order "
                      "the loader yields them)",
                data_phrase=_nonfinite_rows(batch, "the batch"))
        losses.append(value)
        sizes.append(size)
    if not sizes:
        raise ValueError("data yielded no batches.")
    losses = np.asarray(losses, np.float64)
    mean = float(np.dot(losses, sizes) / sum(sizes))
    return mean, float(np.max(np.abs(losses - mean)))


def _sample_streamed(static, hyper, mask, params, data, key, chain_ids,
                     reference, bar) -> _Outputs:
    chains = _init_streamed(static, hyper, mask, params, key, chain_ids)
    source = _batches(data)
    first = next(source)
    structure = jax.tree.structure(first)
    shapes = [np.shape(x) for x in jax.tree.leaves(first)]
    _check_loss(static.loss_fn, params, first)
    pending = [first]

    def next_stack():
        # One batch per chain; batches of another shape (a short last batch)
        # are skipped so that the step compiles once.
        stack = []
        while len(stack) < static.num_chains:
            batch = pending.pop() if pending else next(source)
            if (jax.tree.structure(batch) == structure
                    and [np.shape(x) for x in jax.tree.leaves(batch)] == shapes):
                stack.append(batch)
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *stack)
        if static.sharding is not None:
            stacked = jax.device_put(stacked, static.sharding)
        return stacked

    burnin, every = static.num_burnin_steps, static.num_steps_bw_draws
    num_steps = static.num_steps
    losses, metrics, accepts = [], [], []
    for t in range(num_steps + (1 if static.mala else 0)):
        chains, (loss, m, a) = _step_streamed(static, hyper, mask, chains,
                                              params, reference, next_stack(),
                                              np.int32(t))
        if t >= 1 and static.mala:
            accepts.append(a)  # the acceptance of step t - 1
        if t >= num_steps:
            continue
        metrics.append(m)
        if t >= burnin and (t - burnin) % every == 0:
            losses.append(loss)
            if bar is not None:
                bar.update(1)
    if static.save_metrics:
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *metrics)
    else:
        metrics = None
    mala = None
    if static.mala:
        mala = jnp.stack(_draws(static, accepts), axis=1)
    return _Outputs(losses=jnp.stack(losses, axis=1), failure=chains.failure,
                    failure_step=chains.failure_step,
                    failure_loss=chains.failure_loss, mala=mala,
                    metrics=metrics)
