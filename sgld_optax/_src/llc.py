r"""Local learning coefficient (LLC) estimation with vectorised sampler chains.

The local learning coefficient of a model at trained weights $w^*$ is
estimated from draws $w_1, w_2, \dots$ of the tempered posterior localized at
$w^*$ (Lau et al., 2023), taken by a sampler of the family (`sgld`,
`rmsprop_sgld`, `sghmc`, `sgnht`):

$$
\hat\lambda(w^*) = n\beta \left( \mathbb{E}_w[L_n(w)] - L_n(w^*) \right).
$$

Here all chains run together: one chain's step is the sampler's `update`
followed by `optax.apply_updates`, `jax.vmap` runs every chain at once, and
one `lax.scan` over steps makes the whole run one compiled program. The
compiled program is cached on the loss function, shapes, the sampler and
structural settings; the key and the numeric hyperparameters (the sampler's
float options included) are traced arguments, so a sweep over them compiles
once.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import threading
import warnings
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Mapping,
                    NamedTuple, Optional, Union)

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import io_callback

from sgld_optax._src import base
from sgld_optax._src import diagnostics
from sgld_optax._src import noise as noise_lib
from sgld_optax._src.core import step as step_lib
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.samplers import common as common_lib
from sgld_optax._src.samplers import rmsprop_sgld as rmsprop_sgld_lib
from sgld_optax._src.samplers import sghmc as sghmc_lib
from sgld_optax._src.samplers import sgld as sgld_lib
from sgld_optax._src.samplers import sgnht as sgnht_lib

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

__all__ = ["LLCResult", "estimate_llc"]

# Number of progress-bar updates over a run: few enough to cost nothing.
_PROGRESS_UPDATES = 20


class LLCResult(NamedTuple):
    r"""The outcome of `estimate_llc`.

    All arrays are NumPy arrays on the host.

    Attributes:
      llc_mean: mean of `llc_per_chain` over the chains that did not
        diverge (NaN if all diverged).
      llc_std: standard deviation (`ddof=0`, as devinterp) of
        `llc_per_chain` over the chains that did not diverge.
      llc_per_chain: float64 `(num_chains,)`,
        $n\beta\,(\overline{L}_c - L_n(w^*))$ with $\overline{L}_c$ the mean
        of chain $c$'s loss trace; NaN for a diverged chain.
      loss_trace: float32 `(num_chains, num_draws)`, the minibatch loss at
        each draw, evaluated at the weights before that draw's step.
      init_loss: $L_n(w^*)$, the mean loss over the whole dataset at the
        initial weights.
      nbeta: the inverse temperature $n\beta$ used.
      diverged: bool `(num_chains,)`, chains whose loss became non-finite
        at any step (burn-in included).
      rhat: split $\hat R$ of the loss traces of the chains that did not
        diverge (see `split_rhat`).
      ess: effective sample size of those loss traces (see
        `effective_sample_size`).
      metrics: with `save_metrics=True`, a `Metrics` whose fields are
        `(num_chains, num_steps)` traces over every step (burn-in
        included); otherwise `None`.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    nbeta: float
    diverged: np.ndarray
    rhat: float
    ess: float
    metrics: Optional[Metrics] = None

    @property
    def num_chains(self) -> int:
        """Number of chains."""
        return int(self.loss_trace.shape[0])

    @property
    def num_draws(self) -> int:
        """Number of draws per chain."""
        return int(self.loss_trace.shape[1])

    @property
    def llc_trace(self) -> np.ndarray:
        """Running LLC per chain: `nbeta * (cumulative mean loss - init_loss)`,
        float64 `(num_chains, num_draws)`; its last column is
        `llc_per_chain`."""
        trace = np.asarray(self.loss_trace, np.float64)
        running = np.cumsum(trace, axis=1) / np.arange(1, trace.shape[1] + 1)
        return self.nbeta * (running - self.init_loss)

    def summary(self) -> str:
        """A short text report of the estimate and its diagnostics.

        Returns:
          A multi-line string: the LLC with its spread over chains, the init
          loss, the per-chain values, split R-hat, ESS and diverged chains.
        """
        ok = ~np.asarray(self.diverged)
        per_chain = ", ".join(
            f"{v:.4g}" if d else f"{v:.4g}(diverged)"
            for v, d in zip(self.llc_per_chain, ok))
        bad = np.flatnonzero(~ok).tolist()
        lines = [
            f"LLC = {self.llc_mean:.4g} +/- {self.llc_std:.3g} "
            f"({int(ok.sum())} of {self.num_chains} chains x "
            f"{self.num_draws} draws, nbeta = {self.nbeta:.4g})",
            f"init loss L_n(w*) = {self.init_loss:.6g}",
            f"LLC per chain: {per_chain}",
            f"loss trace: split R-hat = {self.rhat:.3f}, ESS = {self.ess:.1f}",
            f"diverged chains: {bad if bad else 'none'}",
        ]
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> Figure:
        """Plots the loss traces and the per-chain LLC.

        The left panel shows each chain's loss trace against the draw index,
        with the init loss $L_n(w^*)$ as a dashed line; the right panel
        shows each chain's LLC, with the mean and one standard deviation.
        The figure is drawn with matplotlib's Agg canvas, without touching
        pyplot's global state.

        Args:
          path: where to write a PNG, or `None` to write nothing.

        Returns:
          The `matplotlib.figure.Figure`.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_llc = fig.subplots(1, 2, width_ratios=(3, 1))
        colors = [f"C{i % 10}" for i in range(self.num_chains)]
        draws = np.arange(self.num_draws)
        for c in range(self.num_chains):
            label = f"chain {c}" + (" (diverged)" if self.diverged[c] else "")
            ax_loss.plot(draws, self.loss_trace[c], color=colors[c], lw=0.8,
                         alpha=0.85, label=label)
        ax_loss.axhline(self.init_loss, color="k", ls="--", lw=1,
                        label="init loss $L_n(w^*)$")
        ax_loss.set_xlabel("draw")
        ax_loss.set_ylabel("minibatch loss")
        ax_loss.set_title("loss traces")
        if self.num_chains <= 10:
            ax_loss.legend(fontsize="small", loc="upper right")

        chains = np.arange(self.num_chains)
        finite = np.isfinite(self.llc_per_chain)
        ax_llc.scatter(chains[finite], self.llc_per_chain[finite],
                       c=[colors[c] for c in chains[finite]], zorder=3)
        if np.isfinite(self.llc_mean):
            ax_llc.axhline(self.llc_mean, color="k", lw=1,
                           label=f"mean {self.llc_mean:.3g}")
            ax_llc.axhspan(self.llc_mean - self.llc_std,
                           self.llc_mean + self.llc_std, color="0.85")
            ax_llc.legend(fontsize="small")
        ax_llc.set_xticks(chains)
        ax_llc.set_xlabel("chain")
        ax_llc.set_title("LLC per chain")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


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


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(
        x, "__array__")


def _to_numpy(x):
    """A host array from a NumPy/JAX/torch/TF array (torch is not imported)."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu()
    return np.asarray(x)


def _is_one_shot_iterator(data) -> bool:
    if _is_array_like(data) or isinstance(data, (tuple, list, dict)):
        return False
    try:
        return iter(data) is data
    except TypeError:
        return False


def _is_in_memory(data) -> bool:
    leaves = jax.tree_util.tree_leaves(data)
    return bool(leaves) and all(_is_array_like(x) for x in leaves)


def _leading_size(data, name: str = "data") -> int:
    """The common leading size of every leaf of `data`, or a clear error."""
    paths = jax.tree_util.tree_flatten_with_path(data)[0]
    sizes = {}
    for path, leaf in paths:
        shape = np.shape(leaf)
        where = jax.tree_util.keystr(path) or "<root>"
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaves must have a leading (example) axis; "
                f"{name}{where} is a scalar.")
        sizes[where] = shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"{name} leaves must share their leading size n, got {listing}.")
    return next(iter(sizes.values()))


def _check_loss(loss_fn, params, batch):
    try:
        out = jax.eval_shape(loss_fn, params, batch)
    except TypeError as err:
        raise TypeError(
            "loss_fn(params, batch) could not be evaluated on a batch; it must "
            f"take (params, batch) and return a scalar: {err}") from err
    if not (hasattr(out, "shape") and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)):
        got = (f"shape {out.shape} and dtype {out.dtype}"
               if hasattr(out, "shape") else repr(out))
        raise ValueError(
            "loss_fn must return a floating-point scalar, the mean loss over "
            f"the batch; got {got}.")


def _chain_sharding(num_chains: int):
    """A sharding of the chain axis over as many devices as divide it."""
    devices = jax.devices()
    count = max(k for k in range(1, len(devices) + 1) if num_chains % k == 0)
    if count == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices[:count]), ("chains",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("chains"))


# ---------------------------------------------------------------------------
# Minibatch order: a keyed permutation of [0, n), computed where it is needed.


_FEISTEL_ROUNDS = 8


def shuffled_index(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    r"""Entries `positions` of a pseudo-random permutation of `[0, n)`.

    The permutation is an eight-round Feistel network on `2h`-bit integers
    ($4^h \ge n$), keyed by `key`, restricted to `[0, n)` by cycle
    walking: a value that falls outside is permuted again until it lands
    inside. This costs a few integer operations per requested entry, whatever
    `n`, where sorting `n` random keys (as `jax.random.permutation`
    does) would cost $O(n \log n)$ per epoch and an `n`-sized buffer.

    Args:
      key: a PRNG key; a new key gives a new permutation.
      positions: integer array of positions in `[0, n)`.
      n: the size of the permuted range (a Python int, `< 2**31`).

    Returns:
      int32 array shaped like `positions`: the permuted positions.

    References:
      Luby & Rackoff, "How to construct pseudorandom permutations from
      pseudorandom functions", SIAM J. Computing 17 (1988).

      Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    low = np.uint32((1 << half) - 1)
    if noise_lib.key_words(key) is None:
        round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)
    else:  # jax.random.bits's numbers (by default), rounds written out
        y0, y1 = noise_lib.threefry_words(key, (_FEISTEL_ROUNDS,))
        round_keys = y0 ^ y1

    def permute(x):
        left, right = x >> np.uint32(half), x & low
        for r in range(_FEISTEL_ROUNDS):
            left, right = right, left ^ (base.fmix32(right ^ round_keys[r]) & low)
        return (left << np.uint32(half)) | right

    def walk(x):
        return jnp.where(x >= np.uint32(n), permute(x), x)

    x = permute(positions.astype(jnp.uint32))
    x = lax.while_loop(lambda x: jnp.any(x >= np.uint32(n)), walk, x)
    return x.astype(jnp.int32)


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


def _dataset_loss(loss_fn, params, data, chunk):
    """Mean of `loss_fn` over all of `data`, evaluated `chunk` at a time."""
    n = _leading_size(data)
    num_full, rest = divmod(n, chunk)

    def chunk_loss(k):
        batch = jax.tree.map(
            lambda x: lax.dynamic_slice_in_dim(x, k * chunk, chunk), data)
        return loss_fn(params, batch).astype(jnp.float32)

    total = jnp.sum(lax.map(chunk_loss, jnp.arange(num_full))) * chunk
    if rest:
        tail = jax.tree.map(lambda x: x[num_full * chunk:], data)
        total = total + loss_fn(params, tail).astype(jnp.float32) * rest
    return total / n


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


def _batches(data) -> Iterable:
    """Cycles through `data` pass after pass, as host arrays."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield jax.tree.map(_to_numpy, batch)
        if empty:
            raise ValueError("data yielded no batches.")


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


# ---------------------------------------------------------------------------
# The public entry point.


def estimate_llc(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: base.PyTree,
    data: Any,
    *,
    key: Any = 0,
    sampler: Union[str, Callable[..., optax.GradientTransformation]] = "sgld",
    sampler_kwargs: Optional[Mapping[str, Any]] = None,
    learning_rate: base.ScalarOrSchedule,
    nbeta: Optional[float] = None,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    bounding_box_size: Optional[float] = None,
    mask: Optional[base.PyTree] = None,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    batch_size: int = 32,
    save_metrics: bool = False,
    progress: bool = True,
) -> LLCResult:
    r"""Estimates the local learning coefficient at `params` with a sampler of the family.

    Runs `num_chains` chains of `sampler` (`sgld` by default) from
    $w^* =$ `params`, localized there, and returns

    $$
    \hat\lambda(w^*) = n\beta \left(\frac{1}{T}\sum_{t=1}^{T}
    L_{B_t}(w_t) - L_n(w^*)\right),
    $$

    averaged over chains, where $w_t$ is the $t$-th draw, $L_{B_t}$ the mean
    loss on the minibatch of the step taken from it, and $L_n(w^*)$ the mean
    loss on all the data. Each chain takes `num_burnin_steps` steps, then
    `num_draws` draws `num_steps_bw_draws` steps apart.

    **Samplers.** `sampler` is one of `"sgld"`, `"rmsprop_sgld"`, `"sghmc"`
    and `"sgnht"` (`sgld`, `rmsprop_sgld`, `sghmc`, `sgnht`), or a factory
    with their signature, such as `so.sghmc` or
    `functools.partial(so.rmsprop_sgld, alpha=0.9)`. `estimate_llc` gives it
    `learning_rate`, `nbeta`, `noise_level`, `weight_decay`, `localization`,
    `bounding_box_size`, `mask`, `save_metrics` and `key`; `sampler_kwargs`
    gives it the rest, such as `alpha` and `eps` (`rmsprop_sgld`),
    `momentum_decay` (`sghmc`) or `diffusion_factor` (`sgnht`). Each chain
    carries its own sampler state from the sampler's `init` at $w^*$ (its
    running mean of squared gradients, momentum or thermostat). The
    estimate has the same meaning whatever the sampler; the samplers differ
    in how fast their chains mix and in their bias at a finite step size.

    **Keys.** An int `key` stands for `jax.random.key(key)`. Chain $i$ uses
    $k_i$ = `jax.random.fold_in(key, i)` alone, so its draws do not depend
    on `num_chains`: `jax.random.split(k_i)[0]` is its sampler's `key` (the
    noise) and `jax.random.split(k_i)[1]` orders its minibatches.

    The chains are vectorised with `jax.vmap` and, when several devices are
    visible, spread over them with `jax.sharding` (along the largest number
    of devices that divides `num_chains`).

    With in-memory `data`, every step draws a minibatch of `batch_size`
    examples, each chain going through its own random permutation of the
    data epoch after epoch (a last partial batch per epoch is dropped), and
    the whole run is a single compiled program.

    **Compilation.** The program is cached. It is specialised on the
    `loss_fn` object, the shapes and dtypes of `params` and `data`, the
    `num_*` counts, `batch_size`, `save_metrics`, `progress`, whether
    `bounding_box_size` and `mask` are given, a `learning_rate` schedule
    object, the sampler (its name, or the factory object), and the entries
    of `sampler_kwargs` that are not floats (such as `bias_correction`).
    Everything else is an argument of the program, so a second call that
    changes only these reuses it: the `key`, the numbers `learning_rate`,
    `nbeta`, `localization`, `weight_decay`, `noise_level` and
    `bounding_box_size`, the values of `mask`, and the float entries of
    `sampler_kwargs` (such as `alpha`, `eps`, `momentum_decay` and
    `diffusion_factor`, passed to the sampler as float32 scalars). Options
    bound in a factory (a `functools.partial`) are part of the factory: to
    sweep one without compiling again, pass it in `sampler_kwargs`. Pass a
    named `loss_fn`, not a fresh lambda each call.

    Choosing hyperparameters: the step size must be small against the
    posterior's curvature (too large inflates the estimate), localization
    must be weak enough not to cut off the flat directions (too strong
    deflates it), and the loss traces should be flat after burn-in. Check
    `result.plot()` and `result.rhat`.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss over a
        batch (for a likelihood model, the mean negative log-likelihood).
      params: the weights $w^*$, a pytree of arrays; ideally a local minimum
        of $L_n$.
      data: either a pytree of arrays sharing a leading axis of size $n$
        (the dataset, kept on device; tuples, lists and dicts of arrays are
        read this way), or a re-iterable of batches that is not such a
        pytree (a `torch.utils.data.DataLoader`, a grain or `tf.data`
        loader). A batch is what `loss_fn` receives: the same pytree
        structure, with a leading batch axis. From an iterable, each chain
        takes its own batch from the loader at every step (cycling through
        it as often as needed; batches whose shapes differ from the first
        are skipped), the step is compiled once, and `batch_size` is not
        used.
      key: int seed or JAX PRNG key.
      sampler: the name of a sampler of the family (`"sgld"`,
        `"rmsprop_sgld"`, `"sghmc"`, `"sgnht"`) or a factory
        `sampler(learning_rate, *, nbeta, noise_level, weight_decay,
        localization, bounding_box_size, mask, save_metrics, key, **options)`
        returning one of them.
      sampler_kwargs: further keyword arguments of the sampler, or `None`.
        Floats are traced; anything else is part of the program's cache key
        and must be hashable.
      learning_rate: step size $\epsilon$, or an optax schedule of the step
        count.
      nbeta: inverse temperature $n\beta$; `None` means `default_nbeta` of
        the batch size (for an iterable: its `batch_size` attribute, else
        the first batch's size).
      localization: strength $\gamma$ of the pull towards $w^*$.
      weight_decay: strength of an L2 prior centred at 0.
      noise_level: noise scale; leave at 1 except to test.
      bounding_box_size: if given, the chains are clamped to
        $[w^* - b, w^* + b]$.
      mask: optional pytree with the structure of `params` of bools (or 0/1
        numbers); only unmasked weights are sampled.
      num_chains: number of independent chains.
      num_draws: number of draws per chain.
      num_burnin_steps: steps per chain before the first draw.
      num_steps_bw_draws: steps between consecutive draws.
      batch_size: minibatch size for in-memory `data`.
      save_metrics: record the sampler's `Metrics` at every step.
      progress: show a progress bar over draws.

    Returns:
      An `LLCResult`.

    Raises:
      ValueError: for invalid arguments, naming the argument; for an unknown
        sampler name (listing the valid ones), or a `sampler_kwargs` entry
        that `estimate_llc` sets itself.
      TypeError: for arguments of the wrong type, naming the argument; for
        `sampler_kwargs` the sampler does not take, or a factory that does
        not build a sampler of the family.

    Warns:
      RuntimeWarning: when some chains diverge (non-finite loss); they are
        named and left out of `llc_mean` and `llc_std`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import sgld_optax as so
      >>> x = jax.random.normal(jax.random.key(0), (1000, 3))
      >>> y = x @ jnp.array([1.0, -2.0, 0.5])
      >>> def loss_fn(w, batch):
      ...     xb, yb = batch
      ...     return 0.5 * jnp.mean((xb @ w - yb) ** 2)
      >>> w_star = jnp.linalg.lstsq(x, y)[0]
      >>> result = so.estimate_llc(loss_fn, w_star, (x, y), learning_rate=1e-3,
      ...                          nbeta=100.0, num_draws=100, progress=False)
      >>> print(result.summary())  # doctest: +SKIP
      >>> result = so.estimate_llc(
      ...     loss_fn, w_star, (x, y), sampler="sghmc",
      ...     sampler_kwargs={"momentum_decay": 0.2}, learning_rate=1e-3,
      ...     nbeta=100.0, num_draws=100, progress=False)

    References:
      Lau, Furman, Wang, Murfet & Wei, "The local learning coefficient: a
      singularity-aware complexity measure", AISTATS 2025, arXiv:2308.12108.

      Furman & Lau, "Estimating the local learning coefficient at scale",
      2024, arXiv:2402.03698.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    num_chains = _check_int("num_chains", num_chains, 1)
    num_draws = _check_int("num_draws", num_draws, 1)
    num_burnin_steps = _check_int("num_burnin_steps", num_burnin_steps, 0)
    num_steps_bw_draws = _check_int("num_steps_bw_draws", num_steps_bw_draws, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    for name, flag in (("save_metrics", save_metrics),
                       ("progress", progress)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {flag!r}.")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(_is_array_like(x) or np.isscalar(x)
                             for x in leaves):
        raise TypeError("params must be a non-empty pytree of arrays.")
    params = jax.tree.map(jnp.asarray, params)
    key = base.as_key(key, typed=True)

    if _is_one_shot_iterator(data):
        raise TypeError(
            "data is a one-shot iterator; pass a re-iterable (such as a "
            "DataLoader) so that it can be read more than once.")
    in_memory = _is_in_memory(data)
    if in_memory:
        data = jax.tree.map(lambda x: jnp.asarray(_to_numpy(x)), data)
        n = _leading_size(data)
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} is larger than the number of "
                f"examples in data, n={n}.")
        example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            (batch_size,) + x.shape[1:], x.dtype), data)
        _check_loss(loss_fn, params, example)
    else:
        try:
            iter(data)
        except TypeError:
            raise TypeError(
                "data must be a pytree of arrays with a shared leading axis, "
                f"or an iterable of batches; got {type(data).__name__}.") from None

    if nbeta is None:
        if in_memory:
            nbeta = common_lib.default_nbeta(batch_size)
        else:
            size = getattr(data, "batch_size", None)
            if not isinstance(size, (int, np.integer)):
                size = _leading_size(
                    jax.tree.map(_to_numpy, next(iter(data))), "a batch of data")
            nbeta = common_lib.default_nbeta(int(size))
    if callable(nbeta):
        raise TypeError("nbeta must be a number: the LLC needs one temperature.")

    # Validate every hyperparameter (and the mask against params) with the
    # sampler's own checks, on the concrete values, before compiling.
    factory, static_options, traced_options = _resolve_sampler(
        sampler, sampler_kwargs)
    sampler_args = dict(
        nbeta=nbeta, noise_level=noise_level, weight_decay=weight_decay,
        localization=localization, bounding_box_size=bounding_box_size,
        mask=mask, save_metrics=save_metrics, key=0, **(sampler_kwargs or {}))
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read: call it as is
        signature = None
    if signature is not None:
        try:
            signature.bind(learning_rate, **sampler_args)
        except TypeError as err:
            raise TypeError(
                f"sampler {getattr(factory, '__name__', factory)!r} cannot "
                f"take these arguments (check sampler_kwargs): {err}") from None
    check_tx = factory(learning_rate, **sampler_args)
    if not isinstance(check_tx, optax.GradientTransformation):
        raise TypeError(
            "sampler must build an optax transformation of the sampler "
            f"family, got {check_tx!r}.")
    check_state = jax.eval_shape(check_tx.init, params)
    if not step_lib.is_sampler_state(check_state):
        raise TypeError(
            "sampler must build one of the samplers so.sgld, "
            "so.rmsprop_sgld, so.sghmc or so.sgnht (its state must be one of "
            f"theirs), got a state of type {type(check_state).__name__}.")

    lr_schedule = learning_rate if callable(learning_rate) else None
    f32 = lambda v: np.float32(0.0 if v is None or callable(v) else v)
    hyper = _Hyper(learning_rate=f32(learning_rate), nbeta=f32(nbeta),
                   localization=f32(localization),
                   weight_decay=f32(weight_decay),
                   noise_level=f32(noise_level),
                   bounding_box_size=f32(bounding_box_size),
                   sampler_options=traced_options)
    if mask is not None:
        mask = jax.tree.map(jnp.asarray, mask)
    sharding = _chain_sharding(num_chains)
    static = _Static(
        loss_fn=loss_fn, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        batch_size=batch_size if in_memory else 0,
        save_metrics=bool(save_metrics),
        progress=bool(progress),
        lr_schedule=lr_schedule, use_box=bounding_box_size is not None,
        sharding=sharding, sampler=factory, sampler_options=static_options)
    chain_ids = np.arange(num_chains, dtype=np.int32)
    if sharding is not None:
        chain_ids = jax.device_put(chain_ids, sharding)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_draws, desc="LLC draws", unit="draw")
    run_id = next(_run_ids)
    try:
        if in_memory:
            if progress:
                with _progress_lock:
                    _progress_bars[run_id] = bar
            init_loss, losses, metrics, diverged = _sample_in_memory(
                static, hyper, mask, params, data, key, chain_ids,
                np.int32(run_id))
            init_loss, losses = float(init_loss), np.asarray(losses)
        else:
            init_loss = _stream_init_loss(loss_fn, params, data)
            losses, metrics, diverged = _sample_streamed(
                static, hyper, mask, params, data, key, chain_ids, bar)
            losses = np.asarray(losses)
    finally:
        with _progress_lock:
            _progress_bars.pop(run_id, None)
        if bar is not None:
            bar.close()

    if metrics is not None:
        metrics = jax.tree.map(np.asarray, metrics)
    return _summarise(losses, np.asarray(diverged), init_loss, float(nbeta),
                      metrics)


def _summarise(losses, diverged, init_loss, nbeta, metrics) -> LLCResult:
    diverged = diverged | ~np.all(np.isfinite(losses), axis=1)
    ok = ~diverged
    per_chain = nbeta * (losses.astype(np.float64).mean(axis=1) - init_loss)
    per_chain = np.where(ok, per_chain, np.nan)
    if diverged.any():
        warnings.warn(
            f"{int(diverged.sum())} of {len(diverged)} chains diverged "
            f"(non-finite loss): chains {np.flatnonzero(diverged).tolist()}. "
            "They are left out of llc_mean and llc_std; try a smaller "
            "learning_rate or a stronger localization.",
            RuntimeWarning, stacklevel=3)
    if ok.any():
        mean, std = float(per_chain[ok].mean()), float(per_chain[ok].std())
        rhat = diagnostics.split_rhat(losses[ok])
        ess = diagnostics.effective_sample_size(losses[ok])
    else:
        mean = std = rhat = ess = float("nan")
    return LLCResult(llc_mean=mean, llc_std=std, llc_per_chain=per_chain,
                     loss_trace=losses, init_loss=float(init_loss),
                     nbeta=nbeta, diverged=diverged, rhat=rhat, ess=ess,
                     metrics=metrics)
