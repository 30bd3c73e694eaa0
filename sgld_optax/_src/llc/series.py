r"""The LLC over a training run: one estimate per checkpoint, vectorised.

`estimate_llc_series` estimates the LLC at each checkpoint of a series, as
`estimate_llc` would at each, with the chains of several checkpoints in one
compiled program: the run's loop (`loop._run_in_memory`) is vmapped over the
checkpoints' weights and their $L_n(w^*)$, `group_size` checkpoints at a
time to bound the memory. Checkpoints may be given as pytrees, PyTorch or
safetensors files, or orbax checkpoint directories; files and directories
are read one group at a time, when the group runs, and released after it.
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
from sgld_optax._src.llc.result import LLCResult, _summarise

# The bytes that the chains' copies of the params of one group may take when
# `estimate_llc_series` chooses the group size: `num_chains * group_size`
# copies of a checkpoint's params. The sampler's state, the gradients and the
# loss's activations come on top of it.
GROUP_MEMORY_BUDGET = 1 << 30  # 1 GiB


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
      rhat: float64 `(K,)`, each estimate's rank-normalised split
        $\hat R$ (`LLCResult.rhat`).
      ess_bulk: float64 `(K,)`, each estimate's bulk effective sample size
        (`LLCResult.ess_bulk`).
      ess_tail: float64 `(K,)`, each estimate's tail effective sample size
        (`LLCResult.ess_tail`).
    """

    steps: np.ndarray
    results: tuple
    llc_mean: np.ndarray
    llc_std: np.ndarray
    mcse: np.ndarray
    init_loss: np.ndarray
    trustworthy: np.ndarray
    rhat: np.ndarray
    ess_bulk: np.ndarray
    ess_tail: np.ndarray

    def table(self) -> str:
        """The series as a Markdown table, one row per checkpoint.

        Returns:
          A string with columns training step, LLC mean and std, MCSE,
          R-hat, bulk ESS, $L_n(w^*)$, failed chains and the verdict
          (`pass` when every check passed, else `fail`; see
          `results[k].summary()` for which check failed and what to try).
        """
        head = (f"| {'step':>9} | {'llc':>10} | {'std':>9} | {'mcse':>8} | "
                f"{'rhat':>7} | {'ess_bulk':>8} | {'L_n(w*)':>10} | "
                f"{'failed':>6} | {'verdict':>7} |")
        # Right-aligned columns, as wide as the header's cells.
        rule = "|" + "|".join("-" * (len(cell) - 1) + ":"
                              for cell in head.split("|")[1:-1]) + "|"
        lines = [head, rule]
        for k, result in enumerate(self.results):
            failed = int(np.sum(result.diverged))
            verdict = "pass" if self.trustworthy[k] else "fail"
            lines.append(
                f"| {self.steps[k]:9.6g} | {self.llc_mean[k]:10.4g} | "
                f"{self.llc_std[k]:9.3g} | {self.mcse[k]:8.3g} | "
                f"{self.rhat[k]:7.3f} | {self.ess_bulk[k]:8.1f} | "
                f"{self.init_loss[k]:10.4g} | {failed:6d} | {verdict:>7} |")
        return "\n".join(lines)

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


def _check_path(i: int, checkpoint, like) -> None:
    """Checks, before anything is sampled, that checkpoint `i`, a path,
    exists and, when a file, that `like` says what to load it into."""
    name = f"checkpoints[{i}] ({os.fspath(checkpoint)!r})"
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"{name} does not exist.")
    if not os.path.isdir(checkpoint) and like is None:
        raise TypeError(
            f"{name} is a file, and checkpoints given as files need like=: "
            "a params pytree with the structure, shapes and dtypes to load "
            "them into.")


def _load(checkpoint, like, rules):
    """A checkpoint's params: a pytree as it is, a directory through
    `orbax_dirs.restore`, a file through `torch_interop.params_from_torch`
    (paths checked by `_check_path` first)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if os.path.isdir(checkpoint):
            from sgld_optax._src.interop import orbax_dirs
            return orbax_dirs.restore(checkpoint, like)
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
    the chains of `group_size` checkpoints run together as one compiled
    program, vmapped over the checkpoints' weights and $L_n(w^*)$; a last,
    shorter group is padded, so that the program is compiled once per group
    size. With a loader, the checkpoints are estimated one after another.

    Checkpoints given as files or directories are streamed: each group's
    are loaded when the group runs (one checkpoint at a time with a
    loader) and released when it is done, so that at most one group's
    params are held at once; the results keep only NumPy outputs.
    Checkpoints given as pytrees are used as they are. The first checkpoint
    is loaded first and defines the structure, shapes and dtypes; pytrees
    are checked against it at once, files and directories when they are
    loaded.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, as for `estimate_llc`.
      checkpoints: the checkpoints, each a params pytree, the path of a
        PyTorch (`.pt`, `.pth`, `.bin`) or `.safetensors` file, read with
        `torch_interop.params_from_torch(path, like=like, rules=rules)`, or
        the path of an orbax checkpoint directory holding the params
        alone: what orbax's `StandardCheckpointer` or `PyTreeCheckpointer`
        saves, or a `CheckpointManager` step directory holding one item
        (of several, pass the item's directory). A directory
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
      group_size: checkpoints sampled together (>= 1), with in-memory
        data. By default, as many as keep the chains' copies of the params,
        `num_chains * group_size` times the bytes of one checkpoint's
        params, within 1 GiB: at least 1, at most all of them. The
        estimate counts only those copies, not the sampler's state (a
        momentum or preconditioner per chain), the gradients or the loss's
        activations, which can take several times more: with a large
        model, pass a smaller `group_size` (1 samples one checkpoint at a
        time). Ignored with a loader.
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
      An `LLCSeriesResult`: each checkpoint's `LLCResult` and, per
      checkpoint, the estimate, its diagnostics and its verdict, with
      `table()` of them and `plot()` of the LLC against the step.

    Raises:
      TypeError, ValueError: for invalid arguments (naming them), for
        checkpoints whose structure, shapes or dtypes differ from the
        first's (naming the leaves that differ and their shapes), for
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
      >>> series.rhat.shape
      (2,)
      >>> len(series.table().splitlines())  # a header, a rule, 2 rows
      4
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
    base.check_bool("mala", mala)
    if group_size is not None:
        group_size = api._check_int("group_size", group_size, 1)
    num_chains = api._check_int("num_chains", num_chains, 1)
    in_memory = data_lib._is_in_memory(data)
    if in_memory:
        # One device copy of the data for every checkpoint's run.
        data = jax.tree.map(
            lambda x: jnp.asarray(data_lib._to_numpy(x)), data)
    source = _Checkpoints(checkpoints, like, rules)

    kwargs = dict(
        key=key, sampler=sampler, sampler_kwargs=sampler_kwargs,
        learning_rate=learning_rate, nbeta=nbeta, localization=localization,
        weight_decay=weight_decay, noise_level=noise_level,
        bounding_box_size=bounding_box_size, mask=mask,
        num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, batch_size=batch_size,
        save_metrics=False, mala=mala, progress=False)
    if not in_memory:
        # A loader's batches come one at a time: so do the checkpoints.
        results = [api.estimate_llc(loss_fn, source.params(i), data,
                                    **kwargs) for i in range(count)]
        return _collect(steps, results)

    if group_size is None:
        group_size = _default_group_size(source.nbytes, num_chains, count)
    size = min(group_size, count)
    results = []
    for start in range(0, count, size):
        results += _run_group(loss_fn, source,
                              range(start, min(start + size, count)), size,
                              data, kwargs)
    return _collect(steps, results)


def _default_group_size(nbytes: int, num_chains: int, count: int) -> int:
    """As many checkpoints as keep `num_chains * group_size` copies of
    `nbytes` of params within `GROUP_MEMORY_BUDGET`: at least 1, at most
    `count`."""
    fits = GROUP_MEMORY_BUDGET // (num_chains * max(nbytes, 1))
    return int(max(1, min(count, fits)))


def _run_group(loss_fn, source, indices, size, data,
               kwargs) -> list[LLCResult]:
    """The `LLCResult`s of checkpoints `indices`, their chains sampled
    together in a program for `size` checkpoints.

    Their params are loaded here and nothing outside this call refers to
    them: they are released when it returns.
    """
    # Checks and L_n(w*) per checkpoint; the static configuration is the
    # same for all.
    runs = [api._prepare(loss_fn, source.params(i), data, **kwargs)
            for i in indices]
    # A last, shorter group is padded with its first checkpoint, so that
    # every group has one shape and one compiled program.
    padded = runs + [runs[0]] * (size - len(runs))
    stack = lambda *xs: jnp.stack(xs)
    params = jax.tree.map(stack, *[r.params for r in padded])
    reference = jax.tree.map(stack, *[r.reference for r in padded])
    run = runs[0]
    out = _series(run.static, run.hyper, run.mask, params, run.data,
                  run.key, run.chain_ids, reference)
    out = jax.tree.map(np.asarray, out)
    return [_summarise(jax.tree.map(lambda x: x[g], out),
                       init_loss=r.init_loss, nbeta=r.nbeta,
                       num_params=r.num_params, spread=r.spread)
            for g, r in enumerate(runs)]


class _Checkpoints:
    """The checkpoints' params, loaded when asked for.

    Every path is checked at once (it exists; a file has `like`). The
    first checkpoint is loaded at once: it defines the structure, shapes
    and dtypes, against which every other one is checked, pytrees at once
    and files and directories when they are loaded. The first's params are
    kept only until they are asked for.
    """

    def __init__(self, checkpoints, like, rules):
        self.checkpoints, self.like, self.rules = checkpoints, like, rules
        for i, checkpoint in enumerate(checkpoints):
            if _is_path(checkpoint):
                _check_path(i, checkpoint, like)
        self._first = self._load(0)
        self.spec = _spec(self._first)
        self.nbytes = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
                          for _, leaf in self.spec[1])
        for i, checkpoint in enumerate(checkpoints[1:], 1):
            if not _is_path(checkpoint):
                self._check(i, _spec(checkpoint))

    def _load(self, i):
        return jax.tree.map(jnp.asarray, _load(self.checkpoints[i],
                                               self.like, self.rules))

    def params(self, i):
        """Checkpoint `i`'s params, as jax arrays."""
        if i == 0 and self._first is not None:
            params, self._first = self._first, None
            return params
        params = self._load(i)
        if i and _is_path(self.checkpoints[i]):
            self._check(i, _spec(params))
        return params

    def _check(self, i, spec):
        difference = _difference(spec, self.spec, i)
        if difference:
            checkpoint = self.checkpoints[i]
            name = (f" ({os.fspath(checkpoint)!r})" if _is_path(checkpoint)
                    else "")
            raise ValueError(
                f"checkpoints[{i}]{name} differs from checkpoints[0] in "
                f"{difference}. A series samples one architecture: every "
                "checkpoint must have the structure, shapes and dtypes of "
                "the first.")


def _is_path(checkpoint) -> bool:
    return isinstance(checkpoint, (str, os.PathLike))


def _leaf_spec(x) -> jax.ShapeDtypeStruct:
    """The shape and dtype `jnp.asarray(x)` has, without converting `x`
    when it has them."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        try:
            return jax.ShapeDtypeStruct(
                tuple(shape), jax.dtypes.canonicalize_dtype(dtype))
        except TypeError:  # a dtype NumPy does not know (torch's)
            pass
    x = jnp.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _spec(params):
    """`(treedef, [(path, ShapeDtypeStruct), ...])` of a params pytree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return treedef, [(base.leaf_name(path), _leaf_spec(x))
                     for path, x in leaves]


def _difference(spec, first, i) -> str:
    """What differs between checkpoint `i`'s spec and the first's, in
    words, or `""`."""
    (treedef, leaves), (treedef0, leaves0) = spec, first
    if treedef != treedef0:
        paths = [p for p, _ in leaves]
        paths0 = [p for p, _ in leaves0]
        known, known0 = set(paths), set(paths0)
        only = [p for p in paths if p not in known0]
        only0 = [p for p in paths0 if p not in known]
        parts = []
        if only:
            parts.append(f"leaves only in checkpoints[{i}]: "
                         + base.listed(only, most=5))
        if only0:
            parts.append("leaves only in checkpoints[0]: "
                         + base.listed(only0, most=5))
        if not parts:
            parts.append(f"the same leaves in other containers: {treedef} "
                         f"and {treedef0}")
        return "structure (" + "; ".join(parts) + ")"
    fmt = lambda s: f"{s.dtype}[{','.join(map(str, s.shape))}]"
    bad = [f"{path} is {fmt(s)} there and {fmt(s0)} in checkpoints[0]"
           for (path, s), (_, s0) in zip(leaves, leaves0)
           if s.shape != s0.shape or s.dtype != s0.dtype]
    if bad:
        return "shapes or dtypes (" + base.listed(bad, most=3, sep="; ") + ")"
    return ""


def _run_checkpoints(static, hyper, mask, params, data, key, chain_ids,
                     reference):
    """The run's loop vmapped over stacked checkpoints and references."""
    return jax.vmap(
        lambda p, ref: loop._run_in_memory(static, hyper, mask, p, data, key,
                                           chain_ids, ref, np.int32(0)),
    )(params, reference)


_series = jax.jit(_run_checkpoints, static_argnames=("static",))


def _collect(steps, results) -> LLCSeriesResult:
    """The series result of the checkpoints' `LLCResult`s."""
    return LLCSeriesResult(
        steps=steps, results=tuple(results),
        llc_mean=np.asarray([r.llc_mean for r in results], np.float64),
        llc_std=np.asarray([r.llc_std for r in results], np.float64),
        mcse=np.asarray([r.mcse for r in results], np.float64),
        init_loss=np.asarray([r.init_loss for r in results], np.float64),
        trustworthy=np.asarray([r.trustworthy for r in results], bool),
        rhat=np.asarray([r.rhat for r in results], np.float64),
        ess_bulk=np.asarray([r.ess_bulk for r in results], np.float64),
        ess_tail=np.asarray([r.ess_tail for r in results], np.float64))
