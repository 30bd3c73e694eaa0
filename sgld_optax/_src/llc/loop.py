r"""The compiled sampling loop of `estimate_llc`: every chain of a run in one program.

All chains run together: one chain's step is the sampler's `update`
followed by `optax.apply_updates`, `jax.vmap` runs every chain at once, and
one `lax.scan` over steps makes the whole run one compiled program
(in-memory data), or one compiled step is fed batches from the host
(a loader). The program is cached on the loss function, shapes, the sampler
and structural settings (`_Static`); the key and the numeric
hyperparameters (`_Hyper`) are traced arguments, so a sweep over them
compiles once.
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

from sgld_optax._src import noise as noise_lib
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
    _to_numpy,
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
    diverged: jax.Array  # bool (num_chains,)


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


def _chain_step(tx, loss_fn, params, opt_state, batch):
    """One sampler step of one chain; returns the loss before the step."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


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
                       diverged=jnp.zeros((), bool))

    return tx, _constrain(jax.vmap(one)(chain_ids), static.sharding)


def _step_all(static, tx, chains: _Chains, w_star, batches, batch_axis=0):
    """Steps every chain on its own batch (leading chain axis), or on one
    shared batch when `batch_axis` is `None`.

    The chains' initial params are all `w_star`: it is given to each
    chain's sampler state for the step, unbatched, rather than stored once
    per chain. (The localization is traced, so the sampler always keeps
    `initial_params`.)
    """

    def one(c: _Chains, batch):
        params, opt_state, loss = _chain_step(
            tx, static.loss_fn, c.params,
            c.opt_state._replace(initial_params=w_star), batch)
        opt_state = opt_state._replace(initial_params=None)
        metrics = (common_lib.get_metrics(opt_state) if static.save_metrics
                   else None)
        c = c._replace(params=params, opt_state=opt_state,
                       diverged=c.diverged | ~jnp.isfinite(loss))
        return c, (loss, metrics)

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


@_jit(static_argnames=("static",))
def _sample_in_memory(static: _Static, hyper: _Hyper, mask, params, data, key,
                      chain_ids, run_id):
    n = _leading_size(data)
    bs = static.batch_size
    steps_per_epoch = n // bs
    loss_fn, tree_params = static.loss_fn, params
    static, mask, params = _flat(static, mask, params)
    tx, chains = _init_chains(static, hyper, mask, params, key, chain_ids)

    def step(chains: _Chains, t):
        if bs == n:
            # Full-batch steps: the order of the examples does not matter.
            return _step_all(static, tx, chains, params, data,
                             batch_axis=None)
        epoch, pos = t // steps_per_epoch, t % steps_per_epoch
        # Each chain goes through its own random permutation of the data,
        # a new one every epoch, batch_size examples per step.
        positions = pos * bs + jnp.arange(bs, dtype=jnp.int32)
        index = jax.vmap(lambda k: shuffled_index(
            noise_lib.fold_in(k, epoch), positions, n))(chains.data_key)
        batches = jax.tree.map(lambda x: jnp.take(x, index, axis=0), data)
        return _step_all(static, tx, chains, params, batches)

    burnin, every = static.num_burnin_steps, static.num_steps_bw_draws
    num_draws = static.num_draws
    report_every = max(1, math.ceil(num_draws / _PROGRESS_UPDATES))

    def step_and_report(chains, t):
        out = step(chains, t)
        if static.progress:
            done = (t - burnin) // every + 1
            lax.cond(
                (t >= burnin) & ((t - burnin) % every == 0)
                & ((done % report_every == 0) | (done == num_draws)),
                lambda: io_callback(_report_progress, None, run_id, done),
                lambda: None)
        return out

    # One scan over every step keeps a single compiled copy of the step; the
    # draws are then read off the per-step losses.
    num_steps = burnin + num_draws * every
    chains, (losses, metrics) = lax.scan(step_and_report, chains,
                                         jnp.arange(num_steps))
    losses = losses[burnin::every]
    metrics = jax.tree.map(lambda x: x.T, metrics)
    # L_n(w*) in the same program: one compilation per configuration.
    init_loss = _dataset_loss(loss_fn, tree_params, data, bs)
    return init_loss, losses.T, metrics, chains.diverged


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
def _step_streamed(static, hyper, mask, chains, params, batches):
    static, mask, params = _flat(static, mask, params)
    return _step_all(static, _sampler(static, hyper, mask), chains, params,
                     batches)


@_jit(static_argnames=("loss_fn",))
def _batch_loss(loss_fn, params, batch):
    return loss_fn(params, batch).astype(jnp.float32)


def _stream_init_loss(loss_fn, params, data) -> float:
    total, count = 0.0, 0
    for batch in data:
        batch = jax.tree.map(_to_numpy, batch)
        size = _leading_size(batch, "a batch of data")
        total += float(_batch_loss(loss_fn, params, batch)) * size
        count += size
    if count == 0:
        raise ValueError("data yielded no batches.")
    return total / count


def _sample_streamed(static, hyper, mask, params, data, key, chain_ids, bar):
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

    burn_metrics, losses, draw_metrics = [], [], []
    for _ in range(static.num_burnin_steps):
        chains, (_, m) = _step_streamed(static, hyper, mask, chains, params,
                                        next_stack())
        burn_metrics.append(m)
    for _ in range(static.num_draws):
        for s in range(static.num_steps_bw_draws):
            chains, (loss, m) = _step_streamed(static, hyper, mask, chains,
                                               params, next_stack())
            if s == 0:
                losses.append(loss)
            draw_metrics.append(m)
        if bar is not None:
            bar.update(1)
    metrics = None
    if static.save_metrics:
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1),
                               *(burn_metrics + draw_metrics))
    return jnp.stack(losses, axis=1), metrics, chains.diverged


