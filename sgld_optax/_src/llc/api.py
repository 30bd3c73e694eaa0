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

import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from sgld_optax._src import base
from sgld_optax._src.core import step as step_lib
from sgld_optax._src.samplers import common as common_lib
from sgld_optax._src.samplers import rmsprop_sgld as rmsprop_sgld_lib
from sgld_optax._src.samplers import sgld as sgld_lib


from sgld_optax._src.llc.result import LLCResult, _summarise
from sgld_optax._src.llc.loop import (
    _Hyper,
    _Reference,
    _Static,
    _chain_sharding,
    _progress_bars,
    _progress_lock,
    _reference_in_memory,
    _resolve_sampler,
    _run_ids,
    _sample_in_memory,
    _sample_streamed,
    _stream_init_loss)
from sgld_optax._src.llc.data import (
    _check_loss,
    _nonfinite_rows,
    _is_array_like,
    _is_in_memory,
    _is_one_shot_iterator,
    _leading_size,
    _to_numpy,
    nonfinite_init_loss_error)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


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
    mala: bool = False,
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
    `result.plot()` and the verdict at the end of `result.summary()`.

    **Can it be trusted?** $L_n(w^*)$ is computed first; if it is not
    finite, nothing is sampled and the error names the rows (in memory) or
    the batch (from a loader) responsible. During the run, every chain is
    watched at every step, inside the compiled loop: its first non-finite
    loss, or first finite loss above the blow-up bound

    $$
    L_n(w^*) + \frac{100\,(d + 1)}{n\beta} + 10\, s
    $$

    ($d$ the number of sampled parameters, $s$ the largest deviation of a
    batch's loss from $L_n(w^*)$ among the batches it was computed from),
    fails the chain, with the step and the loss in `result.failures`.
    Failed chains are left out of the estimate and its diagnostics. The
    result's `checks` then judge the estimate: no failures, an LLC not
    clearly below 0 or above $d/2$, R-hat below 1.01, bulk and tail ESS of
    at least 100 per chain, and (with `mala=True`) a mean MALA acceptance of
    at least 0.5; the docs' "Can I trust this estimate?" page explains each
    and what to do when one fails.

    **MALA acceptance.** With `mala=True` (for `"sgld"` and
    `"rmsprop_sgld"`), each draw also records the Metropolis-adjusted
    Langevin acceptance probability of the step taken from it, as devinterp
    1.x's `MalaAcceptanceRate` defined it: the step $w_t \to w_{t+1}$ seen
    as a proposal of MALA for the density $e^{-U}$, with $U(w)$ the tempered
    minibatch loss $n\beta L_B(w)$ plus the priors' terms (localization,
    weight decay), and the proposal
    $N(w - \tfrac{\epsilon}{2} G \nabla U(w),\ \epsilon G)$ in both
    directions ($G = 1$ for SGLD; RMSprop's
    preconditioner of the step, held fixed, for `rmsprop_sgld`). Each end is
    evaluated on the minibatch of the step taken from it: $w_t$ on step
    $t$'s batch, $w_{t+1}$ on step $t+1$'s, whose loss and gradient that
    step computes anyway (one extra step is run after the last draw for its
    end point). Only the sampled (unmasked) elements count; a bounding box
    and `noise_level` are not part of the proposal. (devinterp 1.x leaves
    the weight-decay term out of $U$, counts masked elements, records 0 for
    the first draw's step and has no entry for the last draw's; without
    weight decay or a mask, its other entries are these.)

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
      mala: record the MALA acceptance probability of the step taken from
        each draw (`result.mala_acceptance`); `"sgld"` and
        `"rmsprop_sgld"` only.
      progress: show a progress bar over draws.

    Returns:
      An `LLCResult`.

    Raises:
      ValueError: for invalid arguments, naming the argument; for an unknown
        sampler name (listing the valid ones), or a `sampler_kwargs` entry
        that `estimate_llc` sets itself; for `mala=True` with a sampler
        that carries a momentum (`sghmc`, `sgnht`); when $L_n(w^*)$ is not
        finite, naming the data (rows or batch) and any non-finite values
        of `data` and `params`, before sampling.
      TypeError: for arguments of the wrong type, naming the argument; for
        `sampler_kwargs` the sampler does not take, or a factory that does
        not build a sampler of the family.

    Warns:
      RuntimeWarning: when some chains fail (a non-finite loss or a
        blow-up); they are named with the reason and left out of
        `llc_mean` and `llc_std`. Also when the estimate is clearly below 0
        or above $d/2$, with what to try.

    Examples:
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
    base.check_bool("mala", mala)  # _prepare also takes None, for sweeps
    run = _prepare(
        loss_fn, params, data, key=key, sampler=sampler,
        sampler_kwargs=sampler_kwargs, learning_rate=learning_rate,
        nbeta=nbeta, localization=localization, weight_decay=weight_decay,
        noise_level=noise_level, bounding_box_size=bounding_box_size,
        mask=mask, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, batch_size=batch_size,
        save_metrics=save_metrics, mala=mala, progress=progress)
    return _summarise(_execute(run), init_loss=run.init_loss,
                      nbeta=run.nbeta, num_params=run.num_params,
                      spread=run.spread)


class _Run(NamedTuple):
    """A checked, ready-to-run estimate: what `_execute` needs."""

    static: Any
    hyper: Any
    mask: Any
    params: Any
    data: Any
    key: Any
    chain_ids: Any
    reference: Any
    in_memory: bool
    nbeta: float
    num_params: int
    init_loss: float
    spread: float


def _prepare(loss_fn, params, data, *, key, sampler, sampler_kwargs,
             learning_rate, nbeta, localization, weight_decay, noise_level,
             bounding_box_size, mask, num_chains, num_draws,
             num_burnin_steps, num_steps_bw_draws, batch_size, save_metrics,
             mala, progress) -> _Run:
    """Checks the arguments of `estimate_llc` (naming the argument at
    fault), computes $L_n(w^*)$ and builds the compiled loop's static and
    traced configuration."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    num_chains = _check_int("num_chains", num_chains, 1)
    num_draws = _check_int("num_draws", num_draws, 1)
    num_burnin_steps = _check_int("num_burnin_steps", num_burnin_steps, 0)
    num_steps_bw_draws = _check_int("num_steps_bw_draws", num_steps_bw_draws, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    for name, flag in (("save_metrics", save_metrics), ("mala", mala),
                       ("progress", progress)):
        if name == "mala" and flag is None:
            continue  # calibrate_llc's default: where the sampler is first-order
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
    if (type(data).__name__ == "Dataset"
            and hasattr(data, "column_names") and hasattr(data, "with_format")):
        # A Hugging Face datasets.Dataset iterates over rows of lists.
        raise TypeError(
            "data is a Hugging Face Dataset, whose rows are not batches; "
            "pass so.token_data(dataset) (arrays of its columns) instead.")
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

    if mala is None:
        mala = isinstance(check_state, _LANGEVIN_STATES)
    if mala and not isinstance(check_state, _LANGEVIN_STATES):
        raise ValueError(
            "mala=True needs a first-order (Langevin) sampler, 'sgld' or "
            "'rmsprop_sgld': the MALA acceptance is that of a Langevin step's "
            "Gaussian proposal, and the step of this sampler "
            f"({type(check_state).__name__}) carries a momentum.")

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
    num_params = _num_sampled(params, mask)
    sharding = _chain_sharding(num_chains)
    static = _Static(
        loss_fn=loss_fn, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        batch_size=batch_size if in_memory else 0,
        save_metrics=bool(save_metrics),
        progress=bool(progress),
        lr_schedule=lr_schedule, use_box=bounding_box_size is not None,
        sharding=sharding, sampler=factory, sampler_options=static_options,
        mala=bool(mala))
    chain_ids = np.arange(num_chains, dtype=np.int32)
    if sharding is not None:
        chain_ids = jax.device_put(chain_ids, sharding)

    # L_n(w*) first: a non-finite one stops the run before any sampling.
    if in_memory:
        init_loss, spread = _in_memory_init_loss(loss_fn, params, data,
                                                 batch_size)
    else:
        init_loss, spread = _stream_init_loss(loss_fn, params, data)
    reference = _Reference(init_loss=np.float32(init_loss),
                           spread=np.float32(spread),
                           num_params=np.float32(num_params))

    return _Run(static=static, hyper=hyper, mask=mask, params=params,
                data=data, key=key, chain_ids=chain_ids, reference=reference,
                in_memory=in_memory, nbeta=float(nbeta),
                num_params=num_params, init_loss=init_loss, spread=spread)


def _execute(run: _Run):
    """Samples every chain of `run`; returns its `loop._Outputs` on the host."""
    (static, hyper, mask, params, data, key, chain_ids, reference,
     in_memory) = run[:9]
    progress, num_draws = static.progress, static.num_draws
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
            out = _sample_in_memory(static, hyper, mask, params, data, key,
                                    chain_ids, reference, np.int32(run_id))
        else:
            out = _sample_streamed(static, hyper, mask, params, data, key,
                                   chain_ids, reference, bar)
        out = jax.tree.map(np.asarray, out)
    finally:
        with _progress_lock:
            _progress_bars.pop(run_id, None)
        if bar is not None:
            bar.close()

    return out




# The states of the samplers whose step is a Langevin proposal.
_LANGEVIN_STATES = (sgld_lib.SGLDState, rmsprop_sgld_lib.RMSpropSGLDState)


def _num_sampled(params, mask) -> int:
    """$d$: the number of sampled parameters (the unmasked ones)."""
    if mask is None:
        return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    return sum(int(np.count_nonzero(np.asarray(m)))
               for m in jax.tree_util.tree_leaves(mask))


def _in_memory_init_loss(loss_fn, params, data, batch_size):
    """`(L_n(w*), spread)` over in-memory `data`, evaluated `batch_size`
    examples at a time.

    Raises:
      ValueError: when $L_n(w^*)$ is not finite, naming the rows of the
        first chunk whose loss is not, and the non-finite values of `data`
        and `params`.
    """
    mean, spread, first_bad = (float(x) for x in _reference_in_memory(
        loss_fn, params, data, chunk=batch_size))
    if math.isfinite(mean):
        return mean, spread
    n = _leading_size(data)
    first_bad = int(first_bad)
    if first_bad < 0:
        where = "the data as a whole (the sum of the batch losses overflows)"
    else:
        start = first_bad * batch_size
        stop = min(start + batch_size, n) - 1
        where = (f"rows {start} to {stop} of data (the first of the batches "
                 f"of batch_size={batch_size} it was evaluated in whose loss "
                 "is not finite)")
    raise nonfinite_init_loss_error(
        mean, params=params, where=where, data_phrase=_nonfinite_rows(data))
