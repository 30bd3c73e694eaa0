r"""The LLC over a training run: one estimate per checkpoint, vectorised.

`estimate_llc_series` estimates the LLC at each checkpoint of a series, as
`estimate_llc` would at each, with the chains of several checkpoints in one
compiled program: the run's loop (`loop._run_in_memory`) is vmapped over the
checkpoints' weights and their $L_n(w^*)$, `group_size` checkpoints at a
time to bound the memory. Checkpoints may be given as pytrees, PyTorch or
safetensors files, or orbax checkpoint directories.
"""

from __future__ import annotations

import os
from typing import (TYPE_CHECKING, Any, Callable, Mapping, NamedTuple,
                    Optional, Sequence, Union)

import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

from sgld_optax._src import base
from sgld_optax._src.llc import api
from sgld_optax._src.llc import data as data_lib
from sgld_optax._src.llc import loop
from sgld_optax._src.llc.result import _summarise


class LLCSeriesResult(NamedTuple):
    r"""The outcome of `estimate_llc_series`.

    Attributes:
      steps: float64 `(K,)`, the training step of each checkpoint (its
        index when none were given).
      results: the `LLCResult` of each checkpoint, in order.
      llc_mean: float64 `(K,)`, the estimate at each checkpoint.
      llc_std: float64 `(K,)`, its spread over the healthy chains.
      mcse: float64 `(K,)`, its Monte Carlo standard error.
      init_loss: float64 `(K,)`, $L_n(w^*)$ at each checkpoint.
      trustworthy: bool `(K,)`, whether every check of each estimate's
        verdict passed (see `LLCResult.checks`).
    """

    steps: np.ndarray
    results: tuple
    llc_mean: np.ndarray
    llc_std: np.ndarray
    mcse: np.ndarray
    init_loss: np.ndarray
    trustworthy: np.ndarray

    def plot(self, path: Optional[str] = None) -> "Figure":
        """The LLC against the training step, with the loss at each checkpoint.

        The top panel shows `llc_mean` with a band of one `llc_std` (and
        error bars of two MCSEs), checkpoints whose verdict failed hollow;
        the bottom panel shows $L_n(w^*)$.

        Args:
          path: where to write a PNG, or `None` to write nothing.

        Returns:
          The `matplotlib.figure.Figure`.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 5.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax, ax_loss = fig.subplots(2, 1, sharex=True,
                                   height_ratios=(2, 1))
        s, m, sd = self.steps, self.llc_mean, self.llc_std
        ax.fill_between(s, m - sd, m + sd, color="C0", alpha=0.2,
                        label="one std over chains")
        ax.errorbar(s, m, yerr=2 * self.mcse, color="C0", fmt="-",
                    capsize=3, label="LLC (2 MCSE)")
        ok = self.trustworthy
        ax.plot(s[ok], m[ok], "o", color="C0")
        ax.plot(s[~ok], m[~ok], "o", mfc="none", color="C3",
                label="a check failed")
        ax.set_ylabel("LLC")
        ax.legend(fontsize="small")
        ax.set_title("LLC over training")
        ax_loss.plot(s, self.init_loss, "o-", color="k", ms=3)
        ax_loss.set_ylabel("$L_n(w^*)$")
        ax_loss.set_xlabel("training step")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _load(checkpoint, like, rules):
    """A checkpoint's params: a pytree as it is, a directory through
    `orbax_dirs.restore`, a file through `torch_interop.params_from_torch`."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if os.path.isdir(checkpoint):
            from sgld_optax._src.interop import orbax_dirs
            return orbax_dirs.restore(checkpoint, like)
        if like is None:
            raise TypeError(
                "checkpoints given as files need like=: a params pytree "
                "with the structure, shapes and dtypes to load them into.")
        from sgld_optax._src.interop import checkpoints
        return checkpoints.params_from_torch(checkpoint, like=like,
                                             rules=rules)
    return checkpoint


def estimate_llc_series(
    loss_fn: Callable[[Any, Any], jax.Array],
    checkpoints: Sequence[Any],
    data: Any,
    *,
    steps: Optional[Sequence[float]] = None,
    like: Optional[base.PyTree] = None,
    rules: Optional[Sequence[Any]] = None,
    group_size: Optional[int] = None,
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
    mala: bool = False,
) -> LLCSeriesResult:
    r"""Estimates the LLC at every checkpoint of a training run.

    Checkpoint $k$'s estimate is `estimate_llc(loss_fn, checkpoints[k], data,
    key=key, ...)`: the same chains, keys and checks. With in-memory data
    the chains of `group_size` checkpoints (all of them by default) run
    together as one compiled program, vmapped over the checkpoints' weights
    and $L_n(w^*)$; the program is compiled once per group size. With a
    loader, the checkpoints are estimated one after another.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, as for `estimate_llc`.
      checkpoints: the checkpoints, each a params pytree, the path of a
        PyTorch (`.pt`, `.pth`, `.bin`) or `.safetensors` file, read with
        `torch_interop.params_from_torch(path, like=like, rules=rules)`, or
        the path of an orbax checkpoint directory: what orbax's
        `StandardCheckpointer` or `PyTreeCheckpointer` saves, or a
        `CheckpointManager` step directory holding one item. A directory
        is restored into `like`'s structure, shapes and dtypes when `like`
        is given (a saved tree that differs in structure or shapes is a
        `ValueError` naming the leaves), else as saved; onto the default
        device either way (or `like`'s shardings). Any other directory is
        a `ValueError`. All must have one structure, shapes and dtypes.
      data: the data, as for `estimate_llc`.
      steps: the training step of each checkpoint, for the plot; by
        default `0, 1, ...`.
      like: the params pytree files are loaded into (required for files;
        optional for orbax directories, which otherwise restore as saved).
      rules: conversion rules for PyTorch and safetensors files (e.g.
        `torch_interop.gpt2_rules()`); orbax directories ignore them.
      group_size: checkpoints sampled together (>= 1); fewer bound the
        memory, `num_chains * group_size` copies of the params and the
        sampler's state.
      key: as for `estimate_llc`; every checkpoint uses it.
      sampler: as for `estimate_llc`.
      sampler_kwargs: as for `estimate_llc`.
      learning_rate: as for `estimate_llc`.
      nbeta: as for `estimate_llc`.
      localization: as for `estimate_llc`.
      weight_decay: as for `estimate_llc`.
      noise_level: as for `estimate_llc`.
      bounding_box_size: as for `estimate_llc`.
      mask: as for `estimate_llc`.
      num_chains: as for `estimate_llc`.
      num_draws: as for `estimate_llc`.
      num_burnin_steps: as for `estimate_llc`.
      num_steps_bw_draws: as for `estimate_llc`.
      batch_size: as for `estimate_llc`.
      mala: as for `estimate_llc`.

    Returns:
      An `LLCSeriesResult`, with `plot()` of the LLC against the step.

    Raises:
      TypeError, ValueError: for invalid arguments (naming them), for
        checkpoints whose structure or shapes differ from the first's, for
        orbax directories that differ from `like`, and for directories
        that are not orbax checkpoints.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> import sgld_optax as so
      >>> x = np.random.default_rng(0).normal(size=(256, 2)).astype("float32")
      >>> y = x @ np.ones((2, 1), "float32")
      >>> def loss_fn(w, batch):
      ...     return jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> series = so.estimate_llc_series(
      ...     loss_fn, [0.5 * jnp.ones((2, 1)), jnp.ones((2, 1))], (x, y),
      ...     steps=[100, 200], learning_rate=1e-4, nbeta=10.0,
      ...     localization=10.0, num_chains=2, num_draws=50)
      >>> series.llc_mean.shape
      (2,)
    """
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(
            checkpoints, Sequence) or len(checkpoints) == 0:
        raise TypeError("checkpoints must be a non-empty list of params "
                        f"pytrees or checkpoint files, got {checkpoints!r}.")
    count = len(checkpoints)
    if steps is None:
        steps = np.arange(count, dtype=np.float64)
    steps = np.asarray(steps, np.float64)
    if steps.shape != (count,):
        raise ValueError(f"steps must give one step per checkpoint ({count}),"
                         f" got shape {steps.shape}.")
    if group_size is None:
        group_size = count
    group_size = api._check_int("group_size", group_size, 1)
    params_list = [jax.tree.map(jnp.asarray, _load(c, like, rules))
                   for c in checkpoints]
    first = jax.tree_util.tree_structure(params_list[0])
    for i, p in enumerate(params_list[1:], 1):
        if (jax.tree_util.tree_structure(p) != first or any(
                np.shape(a) != np.shape(b) or a.dtype != b.dtype
                for a, b in zip(jax.tree_util.tree_leaves(p),
                                jax.tree_util.tree_leaves(params_list[0])))):
            raise ValueError(
                f"checkpoints[{i}] differs from checkpoints[0] in structure, "
                "shapes or dtypes; a series samples one architecture.")

    kwargs = dict(
        key=key, sampler=sampler, sampler_kwargs=sampler_kwargs,
        learning_rate=learning_rate, nbeta=nbeta, localization=localization,
        weight_decay=weight_decay, noise_level=noise_level,
        bounding_box_size=bounding_box_size, mask=mask,
        num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, batch_size=batch_size,
        save_metrics=False, mala=mala, progress=False)
    if not data_lib._is_in_memory(data):
        results = [api.estimate_llc(loss_fn, p, data, **kwargs)
                   for p in params_list]
        return _collect(steps, results)

    # Checks and L_n(w*) per checkpoint; the static configuration is the
    # same for all.
    runs = [api._prepare(loss_fn, p, data, **kwargs) for p in params_list]
    results = []
    for start in range(0, count, group_size):
        group = runs[start:start + group_size]
        # A last, shorter group is padded with its first checkpoint, so
        # that every group has one shape and one compiled program.
        padded = group + [group[0]] * (min(group_size, count) - len(group))
        stack = lambda *xs: jnp.stack(xs)
        params = jax.tree.map(stack, *[r.params for r in padded])
        reference = jax.tree.map(stack, *[r.reference for r in padded])
        run = group[0]
        out = _series(run.static, run.hyper, run.mask, params, run.data,
                      run.key, run.chain_ids, reference)
        out = jax.tree.map(np.asarray, out)
        for g, r in enumerate(group):
            results.append(_summarise(
                jax.tree.map(lambda x: x[g], out), init_loss=r.init_loss,
                nbeta=r.nbeta, num_params=r.num_params, spread=r.spread))
    return _collect(steps, results)


def _run_checkpoints(static, hyper, mask, params, data, key, chain_ids,
                     reference):
    """The run's loop vmapped over stacked checkpoints and references."""
    return jax.vmap(
        lambda p, ref: loop._run_in_memory(static, hyper, mask, p, data, key,
                                           chain_ids, ref, np.int32(0)),
    )(params, reference)


_series = jax.jit(_run_checkpoints, static_argnames=("static",))


def _collect(steps, results) -> LLCSeriesResult:
    return LLCSeriesResult(
        steps=steps, results=tuple(results),
        llc_mean=np.asarray([r.llc_mean for r in results], np.float64),
        llc_std=np.asarray([r.llc_std for r in results], np.float64),
        mcse=np.asarray([r.mcse for r in results], np.float64),
        init_loss=np.asarray([r.init_loss for r in results], np.float64),
        trustworthy=np.asarray([r.trustworthy for r in results], bool))
