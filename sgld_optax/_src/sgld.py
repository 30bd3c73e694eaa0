"""Stochastic Gradient Langevin Dynamics as an optax gradient transformation."""

from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgld_optax._src import base
from sgld_optax._src import cpu_kernel
from sgld_optax._src import metrics as metrics_lib
from sgld_optax._src import noise as noise_lib
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.sketch import CountSketch, SketchBuffer


class SGLDState(NamedTuple):
    """State of :func:`sgld`.

    Attributes:
      count: int32 scalar, the number of steps taken; schedules read it.
      key: PRNG key (typed ``jax.random.key`` or legacy uint32 ``(2,)``),
        split at every step. Replace it to start an independent chain:
        ``state._replace(key=k)``.
      initial_params: the parameters :math:`w_0` given to ``init``, with the
        params' structure, shapes and dtypes; ``None`` where nothing needs
        them (no localization, bounding box, metrics or sketches).
      metrics: :class:`Metrics` of the last step (float32 scalars), or
        ``None`` unless ``save_metrics=True``.
      sketch: :class:`SketchBuffer` of the last step (float32
        ``(sketch_dim,)`` arrays), or ``None`` unless sketching.
    """

    count: jax.Array
    key: jax.Array
    initial_params: Any
    metrics: Optional[Metrics]
    sketch: Optional[SketchBuffer]


def default_nbeta(batch_size: Any, gradient_accumulation_steps: int = 1) -> float:
    """The default inverse temperature :math:`n\\beta = m / \\log m`.

    :math:`m` is the number of samples behind one gradient, ``batch_size``
    times ``gradient_accumulation_steps``. Where :math:`m \\le 1` the value is
    undefined and 1 is returned with a warning.

    Args:
      batch_size: an int, or an object with an int ``batch_size`` attribute
        (such as a ``torch.utils.data.DataLoader``).
      gradient_accumulation_steps: number of batches accumulated per step.

    Returns:
      :math:`m / \\log m` as a Python float.

    Raises:
      TypeError: if ``batch_size`` is neither an int nor has ``batch_size``.

    Example:
      >>> import sgld_optax as so
      >>> round(so.default_nbeta(64), 3)
      15.389
    """
    size = getattr(batch_size, "batch_size", batch_size)
    for name, value in (("batch_size", size),
                        ("gradient_accumulation_steps",
                         gradient_accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(
                f"{name} must be an int (or an object with an int batch_size "
                f"attribute), got {value!r}.")
    m = int(size) * int(gradient_accumulation_steps)
    if m <= 1:
        warnings.warn(
            f"default_nbeta is undefined for batch_size * "
            f"gradient_accumulation_steps = {m} <= 1; returning 1.",
            UserWarning, stacklevel=2)
        return 1.0
    return m / math.log(m)


def _is_python_zero(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and value == 0)


def _flatten_like(treedef, tree, name: str) -> list:
    """The subtrees of ``tree`` at the leaves of ``treedef`` (``None`` kept)."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must have the structure of params: params is {treedef}, "
            f"{name} is {jax.tree_util.tree_structure(tree)}.") from err


def _check_mask(mask, params):
    """Checks that ``mask`` has the structure and leaf shapes of ``params``."""
    p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
    m_leaves = _flatten_like(p_def, mask, "mask")
    problems = []
    for (path, p), m in zip(p_paths, m_leaves):
        shape = np.shape(m)
        if shape != np.shape(p):
            problems.append(f"{jax.tree_util.keystr(path) or '<root>'}: mask "
                            f"shape {shape}, param shape {np.shape(p)}")
    if problems:
        raise ValueError("mask shapes do not match params:\n  "
                         + "\n  ".join(problems))
    return m_leaves


def _check_floating(params):
    """Raises a TypeError naming every leaf of params that is not a float."""
    bad = [f"{jax.tree_util.keystr(path) or '<root>'}: {jnp.result_type(x)}"
           for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if not jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if bad:
        raise TypeError("sgld samples floating-point params only; these "
                        "leaves are not:\n  " + "\n  ".join(bad))


def _value(hparam, count):
    return hparam(count) if callable(hparam) else hparam


def sgld(
    learning_rate: base.ScalarOrSchedule,
    *,
    nbeta: base.ScalarOrSchedule = 1.0,
    noise_level: base.Scalar = 1.0,
    weight_decay: base.Scalar = 0.0,
    localization: base.Scalar = 0.0,
    bounding_box_size: Optional[base.Scalar] = None,
    mask: Optional[base.PyTree] = None,
    save_metrics: bool = False,
    sketch_dim: Optional[int] = None,
    sketch_seed: int = 0,
    sketch: Optional[CountSketch] = None,
    key: Any = 0,
    native_cpu: bool = False,
) -> optax.GradientTransformation:
    """Stochastic Gradient Langevin Dynamics (SGLD), localized.

    Samples the tempered, localized posterior
    :math:`p(w) \\propto \\exp(-n\\beta L(w) - \\tfrac{\\gamma}{2}\\|w - w_0\\|^2
    - \\tfrac{\\lambda}{2}\\|w\\|^2)` around the initial parameters
    :math:`w_0` (Welling & Teh, 2011; Lau et al., 2023). With gradient
    :math:`\\nabla L` of the mean minibatch loss, step size :math:`\\epsilon`
    and mask :math:`m` (1 where no mask is given), one step is

    .. math::

        w \\leftarrow w - \\frac{\\epsilon}{2}\\, m \\odot \\left(n\\beta\\,
        \\nabla L(w) + \\lambda w + \\gamma (w - w_0)\\right)
        + \\sqrt{\\epsilon}\\, \\sigma\\, m \\odot \\eta,
        \\qquad \\eta \\sim N(0, I),

    followed, when ``bounding_box_size`` :math:`b` is set, by clamping
    :math:`w` to :math:`[w_0 - b, w_0 + b]`. ``update`` returns the updates
    that ``optax.apply_updates`` adds to the params to take this step; this
    is the step of devinterp's ``SGLD`` optimizer.

    Noise is drawn leaf by leaf from the key in the state, which is split
    every step. Run independent chains by giving each its own key, e.g.
    ``jax.vmap(lambda k: state._replace(key=k))(jax.random.split(key, n))``
    and vmapping ``update`` over the states.

    Args:
      learning_rate: step size :math:`\\epsilon` (> 0), a number or an optax
        schedule of the step count.
      nbeta: inverse temperature :math:`n\\beta` (> 0), a number or a
        schedule; see :func:`default_nbeta`.
      noise_level: noise scale :math:`\\sigma` (>= 0). Anything but 1 breaks
        the sampling guarantees and warns.
      weight_decay: :math:`\\lambda` (>= 0), an L2 prior centred at 0.
      localization: :math:`\\gamma` (>= 0), an L2 prior centred at
        :math:`w_0`.
      bounding_box_size: half-width :math:`b` (> 0) of the box around
        :math:`w_0` the params are clamped to, or ``None`` for no box.
      mask: ``None`` or a pytree with the params' structure and shapes, of
        bools or 0/1 numbers: only elements where it is 1 move.
      save_metrics: record :class:`Metrics` of each step in the state (read
        them with :func:`get_metrics`).
      sketch_dim: record count sketches of dimension ``sketch_dim`` of each
        step's components (read them with :func:`get_sketches`).
      sketch_seed: seed of the count sketch's hashes.
      sketch: a prebuilt :class:`CountSketch` to use instead of
        ``sketch_dim`` and ``sketch_seed``; its ``input_dim`` must be the
        total number of params.
      key: int seed or JAX PRNG key of the noise. A Threefry key (the
        default) uses a fused generator; ``rbg`` keys use
        ``jax.random.normal``. Two samplers with the same key draw the same
        noise: give each ``sgld`` in a pipeline (e.g. each partition of
        ``optax.multi_transform``) and each chain its own key.
      native_cpu: on CPU, take each float32 leaf's step (update, metric
        sums, count sketch) in one pass of a native kernel instead of
        XLA's several loops, for faster steps with metrics or sketches
        (plain steps gain nothing). The noise is bitwise the same; updates,
        metrics and sketches agree with XLA's to float32 rounding. The kernel is compiled with the
        system's C++ compiler when the transformation is built (a few
        seconds, once: the library is cached). Other platforms, other
        dtypes, ``rbg`` keys, leaves split over an explicit mesh axis and
        sketches with tables or of more than ``2**16`` dimensions use the
        XLA code. Under an ``Auto`` mesh a leaf's sharding is unknown when
        tracing, so the kernel's operands are gathered (right values,
        replicated updates): keep it off for params sharded that way. See
        the metrics page of the docs.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
      ``params``; ``update.hyperparams`` is a read-only mapping of
      ``learning_rate``, ``nbeta``, ``noise_level``, ``weight_decay``,
      ``localization``, ``bounding_box_size`` and ``mask``. Its state is an
      :class:`SGLDState`; ``initial_params`` is kept only when localization
      is not a literal 0, a bounding box is set, or metrics or sketches are
      recorded.

    Raises:
      ValueError, TypeError: for invalid hyperparameters, naming the argument.
      RuntimeError: with ``native_cpu=True``, if the kernel cannot be
        compiled or loaded (the message has the compiler's output).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import sgld_optax as so
      >>> params = {"w": jnp.ones(3)}
      >>> tx = so.sgld(1e-3, nbeta=10.0, localization=1.0, key=0)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Welling & Teh, "Bayesian learning via stochastic gradient Langevin
      dynamics", ICML 2011.

      Lau, Furman, Wang, Murfet & Wei, "The local learning coefficient: a
      singularity-aware complexity measure", 2023, arXiv:2308.12108.
    """
    base.check_scalar("learning_rate", learning_rate, positive=True,
                      allow_schedule=True)
    base.check_scalar("nbeta", nbeta, positive=True, allow_schedule=True)
    base.check_scalar("noise_level", noise_level, non_negative=True)
    base.check_scalar("weight_decay", weight_decay, non_negative=True)
    base.check_scalar("localization", localization, non_negative=True)
    if bounding_box_size is not None:
        base.check_scalar("bounding_box_size", bounding_box_size, positive=True)
    if not isinstance(save_metrics, (bool, np.bool_)):
        raise TypeError(f"save_metrics must be a bool, got {save_metrics!r}.")
    if sketch is not None and not isinstance(sketch, CountSketch):
        raise TypeError(f"sketch must be a CountSketch, got {sketch!r}.")
    sketch_dim = _static_int("sketch_dim", sketch_dim)
    if sketch_dim is not None and sketch is None:
        # Only a sketch built here uses the seed; checking it otherwise would
        # trip optax.inject_hyperparams, which traces every int argument.
        sketch_seed = _static_int("sketch_seed", sketch_seed)
    if sketch_dim is not None and sketch_dim < 1:
        raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}.")
    if (sketch is not None and sketch_dim is not None
            and sketch.output_dim != sketch_dim):
        raise ValueError(
            f"sketch_dim={sketch_dim} disagrees with sketch.output_dim="
            f"{sketch.output_dim}; pass one of them.")
    if mask is not None:
        for leaf in jax.tree_util.tree_leaves(mask):
            dt = np.asarray(leaf).dtype if not isinstance(
                leaf, jax.core.Tracer) else leaf.dtype
            if not (dt == bool or np.issubdtype(dt, np.number)):
                raise TypeError(f"mask leaves must be bool or 0/1 numbers, got {dt}.")
            if (not isinstance(leaf, jax.core.Tracer)
                    and not np.isin(np.asarray(leaf), (0, 1)).all()):
                raise ValueError(
                    "mask values must be 0 or 1 (or bools): a mask restricts "
                    "which elements move, it does not scale them.")

    if (v := base.concrete_float(noise_level)) is not None and v != 1.0:
        warnings.warn(
            f"noise_level={v} is not 1: the chain no longer samples the "
            "posterior. Use this only for testing.", UserWarning, stacklevel=2)
    if (v := base.concrete_float(nbeta)) is not None and v == 1.0:
        warnings.warn(
            "nbeta is 1: LLC estimates will be off unless that is intended; "
            "see sgld_optax.default_nbeta.", UserWarning, stacklevel=2)

    base.as_key(key)  # Validates now; init builds the key.
    if not isinstance(native_cpu, (bool, np.bool_)):
        raise TypeError(f"native_cpu must be a bool, got {native_cpu!r}.")
    if native_cpu:
        cpu_kernel.load()  # Compiles or finds the kernel; raises if it can't.
    sketching = sketch is not None or sketch_dim is not None
    use_box = bounding_box_size is not None
    use_loc = not _is_python_zero(localization)
    use_wd = not _is_python_zero(weight_decay)
    keep_initial = use_loc or use_box or save_metrics or sketching

    def get_sketch(total: int) -> CountSketch:
        if sketch is not None:
            if sketch.input_dim != total:
                raise ValueError(
                    f"sketch.input_dim={sketch.input_dim} but the params have "
                    f"{total} elements in all.")
            return sketch
        return CountSketch(total, sketch_dim, sketch_seed)

    def scales_of(lr, nb):
        """float32 ``(a_g, a_loc, a_wd, a_noise)``: each component is its
        base vector times one of these (``None`` for an absent term)."""
        half_lr = jnp.asarray(lr, jnp.float32) * 0.5
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return (half_lr * f32(nb),
                half_lr * f32(localization) if use_loc else None,
                half_lr * f32(weight_decay) if use_wd else None,
                jnp.sqrt(f32(lr)) * f32(noise_level))

    def xla_leaf(p, g, m, w0, leaf_key, lr, nb):
        """One leaf's update by XLA, and its base vectors if anything reads them."""
        cd = base.compute_dtype(p.dtype)
        w = p.astype(cd)
        half_lr = jnp.asarray(lr, cd) * 0.5
        g = jnp.zeros_like(w) if g is None else g.astype(cd)
        sg = half_lr * (g * jnp.asarray(nb, cd))
        dist = w - w0.astype(cd) if w0 is not None else None
        loc = (half_lr * (dist * jnp.asarray(localization, cd))
               if use_loc else None)
        wd = (half_lr * (w * jnp.asarray(weight_decay, cd))
              if use_wd else None)
        # With metrics or a sketch, the update is not the noise's only
        # reader.
        eta = noise_lib.standard_normal(leaf_key, p.shape, cd,
                                        shared=save_metrics or sketching)
        xi = (jnp.sqrt(jnp.asarray(lr, cd)) * jnp.asarray(noise_level, cd)
              ) * eta
        if m is not None:
            mm = jnp.asarray(m).astype(cd)
            sg, xi = sg * mm, xi * mm
            loc = loc * mm if loc is not None else None
            wd = wd * mm if wd is not None else None
        drift = sg
        if loc is not None:
            drift = drift + loc
        if wd is not None:
            drift = drift + wd
        u = xi - drift
        if use_box:
            b = jnp.asarray(bounding_box_size, cd)
            w0c = w0.astype(cd)
            u = jnp.clip(w + u, w0c - b, w0c + b) - w
        vecs = None
        if save_metrics or sketching:
            # Metrics and sketches are linear in the unscaled, masked
            # vectors, so they read these rather than the components.
            vecs = _masked((g, dist, w if use_wd else None, eta),
                           mm if m is not None else None)
        return u.astype(p.dtype), vecs

    def base_vectors(p, g, m, w0, leaf_key):
        """The masked (grad, displacement, weight, noise) of a float32 leaf."""
        g = jnp.zeros_like(p) if g is None else g
        return _masked(
            (g, p - w0 if w0 is not None else None, p if use_wd else None,
             noise_lib.standard_normal(leaf_key, p.shape, jnp.float32)),
            None if m is None else jnp.asarray(m).astype(jnp.float32))

    def native_leaves(items, lr, nb, cs):
        """The CPU kernel's step of the float32 leaves ``items``.

        ``items`` holds ``(p, g, m, w0, words, offset)`` per leaf. Returns
        their updates, the kernel's nine sums of products, its sketch
        columns and whether it sketched (it does not take sketches with
        tables or of more than ``MAX_SKETCH_DIM`` dimensions).
        """
        flags = ((cpu_kernel.INITIAL if keep_initial else 0)
                 | (cpu_kernel.LOCALIZATION if use_loc else 0)
                 | (cpu_kernel.WEIGHT_DECAY if use_wd else 0)
                 | (cpu_kernel.BOX if use_box else 0)
                 | (cpu_kernel.MASK if mask is not None else 0)
                 | (cpu_kernel.SUMS if save_metrics else 0))
        sketch_dim, salts = 0, (0, 0)
        if (sketching and cs.hash_indices is None
                and cs.output_dim <= cpu_kernel.MAX_SKETCH_DIM):
            flags |= cpu_kernel.SKETCH
            sketch_dim, salts = cs.output_dim, tuple(int(x) for x in cs._salts)
        zero = jnp.zeros((), jnp.float32)
        scalars = tuple(zero if a is None else a
                        for a in scales_of(lr, nb))
        scalars += (jnp.asarray(bounding_box_size, jnp.float32)
                    if use_box else zero,)
        leaves = [(p, jnp.zeros_like(p) if g is None
                   else g.astype(jnp.float32), w0,
                   None if m is None else jnp.asarray(m).astype(jnp.float32))
                  for p, g, m, w0, _, _ in items]
        updates, sums, columns = cpu_kernel.step(
            leaves, [words for *_, words, _ in items], scalars, flags=flags,
            sketch_dim=sketch_dim, offsets=[off for *_, off in items],
            salts=salts)
        return updates, sums, columns, bool(flags & cpu_kernel.SKETCH)

    def step_leaves(p_leaves, g_leaves, m_leaves, w0_leaves, leaf_keys, lr,
                    nb, *, native):
        """Updates, metrics and sketch of one step (``None`` where not kept).

        With ``native``, the float32 leaves go through the one-pass CPU
        kernel of ``cpu_kernel.py``, in one call, and the other leaves
        through the XLA code below.
        """
        scales = scales_of(lr, nb)
        total = sum(int(np.size(p)) for p in p_leaves)
        cs = get_sketch(total) if sketching else None
        pairs = metrics_lib.needed_pairs(scales)
        k = cs.output_dim if sketching else 0
        sketches = {j: jnp.zeros((k,), jnp.float32)
                    for j, a in enumerate(scales) if a is not None}
        offsets = np.cumsum([0] + [int(np.size(p)) for p in p_leaves])
        kernel = {}  # leaf index -> (p, g, m, w0, key words, offset)
        for i, p in enumerate(p_leaves):
            words = noise_lib.key_words(leaf_keys[i])
            if (native and jnp.dtype(p.dtype) == jnp.float32
                    and words is not None and np.size(p) < 2**32
                    and not _sharded_explicitly(p)):
                kernel[i] = (p, g_leaves[i], m_leaves[i], w0_leaves[i],
                             words, int(offsets[i]))
        sums = {pair: jnp.zeros((), jnp.float32) for pair in pairs}
        sketched = False
        if kernel:
            updates, kernel_sums, columns, sketched = native_leaves(
                list(kernel.values()), lr, nb, cs)
            kernel_out = dict(zip(kernel, updates))
            sums = {pair: kernel_sums[cpu_kernel.SUM_PAIRS.index(pair)]
                    for pair in pairs}
            if sketched:
                sketches = {j: columns[:, j] for j in sketches}

        out, bases = [], []
        for i, (p, g, m, w0) in enumerate(zip(p_leaves, g_leaves, m_leaves,
                                               w0_leaves)):
            vecs = None
            if i in kernel:
                u = kernel_out[i]
                if sketching and not sketched:
                    vecs = base_vectors(p, g, m, w0, leaf_keys[i])
            else:
                u, vecs = xla_leaf(p, g, m, w0, leaf_keys[i], lr, nb)
                if vecs is not None:
                    bases.append(vecs)
            if native and sketching and vecs is not None:
                # Leaves the kernel did not sketch, one scatter per vector.
                for j in sketches:
                    sketches[j] = cs.scatter(sketches[j], vecs[j].reshape(-1),
                                             int(offsets[i]))
            out.append(u)

        new_metrics = new_sketch = None
        if native:
            if save_metrics:
                extra = metrics_lib.sums_of_products(bases, pairs)
                sums = {pair: sums[pair] + extra[pair] for pair in pairs}
                new_metrics = metrics_lib.metrics_from_sums(
                    sums, scales, _numel(p_leaves, m_leaves))
            if sketching:
                new_sketch = _sketch_buffer(sketches, scales, k)
            return out, new_metrics, new_sketch
        if save_metrics:
            new_metrics = metrics_lib.metrics_from_bases(
                bases, scales, _numel(p_leaves, m_leaves))
        if sketching:
            new_sketch = _sketch_bases(cs, bases, scales)
        return out, new_metrics, new_sketch

    def init_fn(params):
        leaves = jax.tree_util.tree_leaves(params)
        _check_floating(params)
        if mask is not None:
            _check_mask(mask, params)
        if sketching:
            get_sketch(sum(int(np.size(x)) for x in leaves))
        return SGLDState(
            count=jnp.zeros((), jnp.int32),
            key=base.as_key(key),
            # A copy, so that donating the params to a later step cannot
            # free the buffers w0 lives in.
            initial_params=(jax.tree.map(lambda x: jnp.array(x, copy=True),
                                         params)
                            if keep_initial else None),
            metrics=Metrics.zeros() if save_metrics else None,
            sketch=(SketchBuffer.zeros(sketch.output_dim if sketch is not None
                                       else sketch_dim)
                    if sketching else None),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "sgld needs the current params: call update(grads, state, "
                "params).")
        p_leaves, treedef = jax.tree_util.tree_flatten(params)
        g_leaves = _flatten_like(treedef, updates, "grads")
        m_leaves = (treedef.flatten_up_to(mask) if mask is not None
                    else [None] * len(p_leaves))
        w0_leaves = (treedef.flatten_up_to(state.initial_params)
                     if keep_initial else [None] * len(p_leaves))

        lr = _value(learning_rate, state.count)
        nb = _value(nbeta, state.count)
        new_key, step_key = noise_lib.split(state.key)
        leaf_keys = noise_lib.fold_in_range(step_key, len(p_leaves))

        if save_metrics and sum(int(np.size(p)) for p in p_leaves) >= 2**31:
            raise ValueError(
                "save_metrics counts parameters in int32, and these params "
                "have 2**31 or more elements.")
        operands = (p_leaves, g_leaves, m_leaves, w0_leaves, leaf_keys, lr, nb)
        if native_cpu:
            out, new_metrics, new_sketch = base.platform_dependent(
                *operands, cpu=functools.partial(step_leaves, native=True),
                default=functools.partial(step_leaves, native=False))
        else:
            out, new_metrics, new_sketch = step_leaves(*operands, native=False)
        if new_metrics is None:
            new_metrics = state.metrics
        if new_sketch is None:
            new_sketch = state.sketch
        new_state = SGLDState(
            count=optax.safe_increment(state.count),
            key=new_key,
            initial_params=state.initial_params,
            metrics=new_metrics,
            sketch=new_sketch,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    # Readable by tools that translate the sampler to other frameworks.
    update_fn.hyperparams = types.MappingProxyType(dict(
        learning_rate=learning_rate, nbeta=nbeta, noise_level=noise_level,
        weight_decay=weight_decay, localization=localization,
        bounding_box_size=bounding_box_size, mask=mask))
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _static_int(name, value):
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static int; with optax.inject_hyperparams pass "
            f"static_args=('key', 'sketch_dim', 'sketch_seed').")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    return int(arr)


def _sharded_explicitly(x) -> bool:
    """Whether ``x`` is split over devices along an explicit mesh axis."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return False
    spec = getattr(getattr(typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


def _masked(vectors, mask):
    """``vectors`` times ``mask`` (``None`` entries, or no mask, kept)."""
    if mask is None:
        return tuple(vectors)
    return tuple(None if v is None else v * mask for v in vectors)


def _numel(p_leaves, m_leaves):
    """The number of unmasked params (a Python int without masks)."""
    return sum(int(np.size(p)) if m is None
               else jnp.count_nonzero(m).astype(jnp.int32)
               for p, m in zip(p_leaves, m_leaves))


def _sketch_buffer(sketches: dict, scales, k: int) -> SketchBuffer:
    """The SketchBuffer from the sketches of base vector ``j`` (a dict)."""
    zero = jnp.zeros((k,), jnp.float32)
    col = {j: v * scales[j] for j, v in sketches.items()}
    sg, loc, wd, xi = (col.get(j, zero) for j in range(4))
    return SketchBuffer(scaled_grad=sg, unscaled_grad=sg, localization=loc,
                        weight_decay=wd, noise=xi)


def _sketch_bases(cs: CountSketch, bases, scales) -> SketchBuffer:
    """Sketches the components of a step from its unscaled vectors.

    A count sketch is linear, so the sketch of each component is its scale
    times the sketch of its base vector (see ``metrics_from_bases``).
    """
    # Component j (scaled grad, localization, weight decay, noise) is a
    # multiple of base vector j (grad, displacement, weight, noise).
    js = [j for j, a in enumerate(scales) if a is not None]
    sketches = dict(zip(js, cs._sketch_concatenated(
        [[vecs[j] for j in js] for vecs in bases])))
    return _sketch_buffer(sketches, scales, cs.output_dim)


def _find_states(opt_state) -> list[SGLDState]:
    is_state = lambda x: isinstance(x, SGLDState)
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=is_state)
    return [x for x in nodes if is_state(x)]


def get_metrics(opt_state: optax.OptState) -> Metrics:
    """The :class:`Metrics` of the last step, from any optax state.

    Finds every :class:`SGLDState` inside ``opt_state`` (through
    ``optax.chain``, ``masked``, ``multi_transform``, ``apply_if_finite``,
    ``inject_hyperparams``, ``MultiSteps``...) and combines them as one
    parameter vector: norms as the root of summed squares, dot products and
    ``numel`` summed.

    Args:
      opt_state: an optax state containing at least one sgld state.

    Returns:
      The combined :class:`Metrics`.

    Raises:
      ValueError: if there is no sgld state, or one was built without
        ``save_metrics=True``.
    """
    states = _find_states(opt_state)
    if not states:
        raise ValueError("get_metrics found no sgld state in opt_state.")
    if any(s.metrics is None for s in states):
        raise ValueError(
            "metrics were not enabled: build the transformation with "
            "sgld(..., save_metrics=True).")
    return metrics_lib.aggregate(s.metrics for s in states)


def get_sketches(opt_state: optax.OptState) -> SketchBuffer:
    """The :class:`SketchBuffer` of the last step, from any optax state.

    Args:
      opt_state: an optax state containing exactly one sgld state that
        sketches.

    Returns:
      The :class:`SketchBuffer`.

    Raises:
      ValueError: if no sgld state sketches, or several do (their sketches
        index different parameter vectors and cannot be combined).
    """
    states = _find_states(opt_state)
    if not states:
        raise ValueError("get_sketches found no sgld state in opt_state.")
    sketched = [s for s in states if s.sketch is not None]
    if not sketched:
        raise ValueError(
            "sketches were not enabled: build the transformation with "
            "sgld(..., sketch_dim=k).")
    if len(sketched) > 1:
        raise ValueError(
            f"found {len(sketched)} sgld states with sketches; their sketches "
            "cover different parameters and cannot be combined. Read each "
            "state's .sketch field.")
    return sketched[0].sketch
