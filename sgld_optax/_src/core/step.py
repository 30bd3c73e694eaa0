r"""One stochastic-gradient MCMC step over a pytree, written once.

Every sampler of the family is this step with a preconditioner
(`preconditioners.py`) and a dynamics. With step size $\epsilon$, drift
$D = \tfrac{\epsilon}{2} M \odot G \odot \nabla U(w)$ (`terms.py`) and noise
$\xi = \sqrt{\epsilon}\, \sigma\, M \odot \sqrt{G} \odot \eta$,
$\eta \sim N(0, I)$:

- **Langevin** (SGLD, RMSprop-SGLD): $\Delta w = \xi - D$.
- **Momentum** (SGHMC, Chen, Fox & Guestrin 2014) with per-step friction
  $\alpha$: $v \leftarrow (1 - \alpha) v - D + \sqrt{\alpha}\, \xi$,
  $\Delta w = v$. At $\alpha = 1$ this is the Langevin step.
- **Thermostat** (SGNHT, Ding et al. 2014) with diffusion factor $a$ and
  thermostat $\zeta$ (starting at $a$):
  $v \leftarrow (1 - \zeta) v - D + \sqrt{a}\, \xi$, $\Delta w = v$,
  $\zeta \leftarrow \zeta + \tfrac{1}{d}\|v\|^2 - \sigma^2 \tfrac{\epsilon}{2}$
  over the $d$ sampled elements.

Then, with a bounding box of half-width $b$, $w + \Delta w$ is clamped to
$[w_0 - b, w_0 + b]$ (and the momentum becomes the step taken).

The step also returns its **components**: each a list of
`(scale, vector key)`, the component being $\sum \text{scale} \times
\text{vector}$, where the vectors are unscaled per-leaf arrays (masked, and
preconditioned where the key says so). Metrics and count sketches are
computed from them by name (`metrics.py`, `sketch.py`), generically: for SGLD
the gradient's `scaled_grad` and `unscaled_grad` share one vector, and
`localization` and `distance` another, so each sum is formed once.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgld_optax._src import base
from sgld_optax._src import metrics as metrics_lib
from sgld_optax._src import noise as noise_lib
from sgld_optax._src.core import preconditioners as precond_lib
from sgld_optax._src.core import terms as terms_lib
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.sketch import CountSketch, SketchBuffer

NOISE = "noise"

# The NamedTuple state classes of the family's samplers, for finding them
# inside composed optax states.
STATE_TYPES: list = []


def sampler_state(cls):
    """Registers `cls` as a sampler state (class decorator)."""
    STATE_TYPES.append(cls)
    return cls


def is_sampler_state(x) -> bool:
    """Whether `x` is the state of one of the family's samplers."""
    return isinstance(x, tuple(STATE_TYPES))


class Dynamics(NamedTuple):
    r"""How the drift and noise move the parameters.

    Attributes:
      kind: `"langevin"`, `"momentum"` or `"thermostat"`.
      friction: the per-step friction $\alpha$ (momentum) or diffusion
        factor $a$ (thermostat); `None` for Langevin.
    """

    kind: str
    friction: Any = None

    @property
    def fields(self) -> tuple:
        return {"langevin": (), "momentum": ("momentum",),
                "thermostat": ("momentum", "thermostat")}[self.kind]


def _key(base_name: str, factor) -> tuple:
    """The key of a vector: its base, and whether a factor multiplies it."""
    return (base_name, factor is not None)


def transformation(
    name: str,
    state_type,
    *,
    learning_rate,
    nbeta,
    noise_level,
    weight_decay,
    localization,
    priors: Sequence[terms_lib.GaussianPrior],
    bounding_box_size,
    mask,
    save_metrics: bool,
    sketch_dim: Optional[int],
    sketch_seed: int,
    sketch: Optional[CountSketch],
    key,
    preconditioner: precond_lib.Preconditioner,
    dynamics: Dynamics,
    hyperparams: dict,
) -> optax.GradientTransformationExtraArgs:
    """Builds a sampler of the family; the samplers' factories call this.

    Validates the shared hyperparameters (naming the argument), decides from
    them which state exists, and returns the optax transformation whose
    `update` takes one step. `state_type` is the sampler's state
    NamedTuple: `count`, `key`, `initial_params`, the preconditioner's
    and the dynamics' fields, `metrics` and `sketch`.
    """
    if key is None:
        raise TypeError(base.MISSING_KEY.format(sampler=name))
    base.check_scalar("learning_rate", learning_rate, positive=True,
                      allow_schedule=True)
    base.check_scalar("nbeta", nbeta, positive=True, allow_schedule=True)
    base.check_scalar("noise_level", noise_level, non_negative=True)
    base.check_scalar("weight_decay", weight_decay, non_negative=True)
    base.check_scalar("localization", localization, non_negative=True)
    if bounding_box_size is not None:
        base.check_scalar("bounding_box_size", bounding_box_size, positive=True)
    base.check_bool("save_metrics", save_metrics)
    if sketch is not None and not isinstance(sketch, CountSketch):
        raise TypeError(f"sketch must be a CountSketch, got {sketch!r}.")
    sketch_dim = base.static_int("sketch_dim", sketch_dim)
    if sketch_dim is not None and sketch is None:
        # Only a sketch built here uses the seed; checking it otherwise would
        # trip optax.inject_hyperparams, which traces every int argument.
        sketch_seed = base.static_int("sketch_seed", sketch_seed)
    if sketch_dim is not None and sketch_dim < 1:
        raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}.")
    if (sketch is not None and sketch_dim is not None
            and sketch.output_dim != sketch_dim):
        raise ValueError(
            f"sketch_dim={sketch_dim} disagrees with sketch.output_dim="
            f"{sketch.output_dim}; pass one of them.")
    base.check_mask(mask)
    extra_priors = tuple(priors) if isinstance(priors, (list, tuple)) else ()
    priors = terms_lib.priors_of(localization, weight_decay, priors)
    if (v := base.concrete_float(noise_level)) is not None and v != 1.0:
        warnings.warn(
            f"noise_level={v} is not 1: the chain no longer samples the "
            "posterior. Use this only for testing.", UserWarning, stacklevel=3)
    if (v := base.concrete_float(nbeta)) is not None and v == 1.0:
        warnings.warn(
            "nbeta is 1: LLC estimates will be off unless that is intended; "
            "see sgld_optax.default_nbeta.", UserWarning, stacklevel=3)
    base.as_key(key)  # Validates now; init builds the key.

    sketching = sketch is not None or sketch_dim is not None
    use_box = bounding_box_size is not None
    observing = save_metrics or sketching
    keep_initial = (terms_lib.needs_initial(priors) or use_box or observing)
    centers = terms_lib.given_centers(priors)
    extra_fields = preconditioner.fields + dynamics.fields

    def get_sketch(total: int) -> CountSketch:
        if sketch is not None:
            if sketch.input_dim != total:
                raise ValueError(
                    f"sketch.input_dim={sketch.input_dim} but the params have "
                    f"{total} elements in all.")
            return sketch
        return CountSketch(total, sketch_dim, sketch_seed)

    def init_fn(params):
        p_leaves = jax.tree_util.tree_leaves(params)
        base.check_floating(params, name)
        if mask is not None:
            base.check_shapes_like(mask, params, "mask")
        for c in centers:
            base.check_shapes_like(c, params, "prior center")
        if sketching:
            get_sketch(sum(int(np.size(x)) for x in p_leaves))
        fields = dict(preconditioner.init(p_leaves))
        if dynamics.kind != "langevin":
            fields["momentum"] = [jnp.zeros(p.shape, base.compute_dtype(p.dtype))
                                  for p in p_leaves]
        if dynamics.kind == "thermostat":
            fields["thermostat"] = jnp.asarray(dynamics.friction, jnp.float32)
        treedef = jax.tree_util.tree_structure(params)
        return state_type(
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
            **{f: (v if f == "thermostat"
                   else jax.tree_util.tree_unflatten(treedef, v))
               for f, v in fields.items()},
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                f"{name} needs the current params: call update(grads, state, "
                "params).")
        p_leaves, treedef = jax.tree_util.tree_flatten(params)
        n_leaves = len(p_leaves)
        g_leaves = base.flatten_like(treedef, updates, "grads")
        m_leaves = (treedef.flatten_up_to(mask) if mask is not None
                    else [None] * n_leaves)
        w0_leaves = (treedef.flatten_up_to(state.initial_params)
                     if keep_initial else [None] * n_leaves)
        c_leaves = [treedef.flatten_up_to(c) for c in centers]
        fields = {f: (getattr(state, f) if f == "thermostat"
                      else treedef.flatten_up_to(getattr(state, f)))
                  for f in extra_fields}

        lr = base.value_at(learning_rate, state.count)
        nb = base.value_at(nbeta, state.count)
        new_key, step_key = noise_lib.split(state.key)
        leaf_keys = noise_lib.fold_in_range(step_key, n_leaves)
        total = sum(int(np.size(p)) for p in p_leaves)
        if save_metrics and total >= 2**31:
            raise ValueError(
                "save_metrics counts parameters in int32, and these params "
                "have 2**31 or more elements.")

        new_fields, factors = preconditioner.update(
            {f: fields[f] for f in preconditioner.fields}, g_leaves,
            state.count)
        terms = terms_lib.drift_terms(nb, priors)
        friction = (None if dynamics.kind == "langevin"
                    else fields["thermostat"] if dynamics.kind == "thermostat"
                    else dynamics.friction)
        noise_mult = (None if dynamics.kind == "langevin"
                      else dynamics.friction)

        out, vectors, momenta = [], [], []
        for i, p in enumerate(p_leaves):
            cd = base.compute_dtype(p.dtype)
            w = p.astype(cd)
            g = g_leaves[i]
            g = jnp.zeros_like(w) if g is None else g.astype(cd)
            w0 = w0_leaves[i]
            m = (None if m_leaves[i] is None
                 else jnp.asarray(m_leaves[i]).astype(cd))
            f_drift = factors.drift[i]
            f_noise = factors.noise[i]
            half_lr = jnp.asarray(lr, cd) * 0.5
            bases = {t.base: terms_lib.base_vector(
                t.base, w, g, w0, [c[i] for c in c_leaves]) for t in terms}

            # The drift, term by term: (eps/2) * M * G * coef * base.
            drift = None
            for t in terms:
                x = bases[t.base] * jnp.asarray(t.coef, cd)
                if f_drift is not None:
                    x = x * f_drift
                x = half_lr * x
                if m is not None:
                    x = x * m
                drift = x if drift is None else drift + x
            eta = noise_lib.standard_normal(leaf_keys[i], p.shape, cd,
                                            shared=observing)
            scale = jnp.sqrt(jnp.asarray(lr, cd)) * jnp.asarray(noise_level, cd)
            if noise_mult is not None:
                scale = scale * jnp.sqrt(jnp.asarray(noise_mult, cd))
            xi = scale * eta
            if f_noise is not None:
                xi = xi * f_noise
            if m is not None:
                xi = xi * m

            if dynamics.kind == "langevin":
                u = xi - drift
            else:
                v = fields["momentum"][i]
                u = (1 - jnp.asarray(friction, cd)) * v - drift + xi
            if use_box:
                b = jnp.asarray(bounding_box_size, cd)
                w0c = w0.astype(cd)
                u = jnp.clip(w + u, w0c - b, w0c + b) - w
            if dynamics.kind != "langevin":
                momenta.append(u)
            out.append(u.astype(p.dtype))

            if observing:
                # Unscaled vectors by key; the metrics and sketches scale them.
                vecs = {}
                for t in terms:
                    vecs[_key(t.base, f_drift)] = bases[t.base] * (
                        f_drift if f_drift is not None else 1)
                    if t.base == terms_lib.GRAD and f_drift is not None:
                        vecs[_key(t.base, None)] = bases[t.base]
                if w0 is not None:
                    vecs[_key(terms_lib.DISPLACEMENT, None)] = bases.get(
                        terms_lib.DISPLACEMENT, w - w0.astype(cd))
                vecs[_key(NOISE, f_noise)] = (eta if f_noise is None
                                              else eta * f_noise)
                if m is not None:
                    vecs = {k: x * m for k, x in vecs.items()}
                vectors.append(vecs)

        new_fields = dict(new_fields)
        numel = None
        if observing or dynamics.kind == "thermostat":
            numel = _numel(p_leaves, m_leaves)
        if dynamics.kind != "langevin":
            new_fields["momentum"] = momenta
        if dynamics.kind == "thermostat":
            kinetic = sum(jnp.sum(jnp.square(v).astype(jnp.float32))
                          for v in momenta)
            target = (jnp.asarray(noise_level, jnp.float32) ** 2
                      * jnp.asarray(lr, jnp.float32) * 0.5)
            # With every element masked there is no kinetic energy to read.
            d = jnp.maximum(jnp.asarray(numel, jnp.float32), 1.0)
            new_fields["thermostat"] = fields["thermostat"] + kinetic / d - target

        new_metrics, new_sketch = state.metrics, state.sketch
        if observing:
            preconditioned = any(f is not None for f in factors.drift)
            comps = components(terms, preconditioned, lr, nb, noise_level,
                               noise_mult, keep_initial)
            if save_metrics:
                new_metrics = metrics_lib.metrics_from_components(
                    comps, vectors, numel)
            if sketching:
                new_sketch = _sketch(get_sketch(total), comps, vectors)
        new_state = state._replace(
            count=optax.safe_increment(state.count),
            key=new_key,
            metrics=new_metrics,
            sketch=new_sketch,
            **{f: (v if f == "thermostat"
                   else jax.tree_util.tree_unflatten(treedef, v))
               for f, v in new_fields.items()},
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    # Readable by tools that translate the sampler to other frameworks.
    update_fn.hyperparams = types.MappingProxyType(dict(
        sampler=name, learning_rate=learning_rate, nbeta=nbeta,
        noise_level=noise_level, weight_decay=weight_decay,
        localization=localization, priors=extra_priors,
        bounding_box_size=bounding_box_size, mask=mask, **hyperparams))
    # The step's preconditioner, for code that needs its factors G_t (the
    # MALA acceptance of a step) without taking the step again.
    update_fn.preconditioner = preconditioner
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def components(terms, preconditioned: bool, lr, nb, noise_level, noise_mult,
               has_displacement) -> dict:
    """The step's named components, each a list of `(scale, vector key)`.

    Scales are float32 scalars; the vector keys index the per-leaf dicts
    of unscaled (masked, maybe preconditioned) vectors the step builds.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    half_lr = f32(lr) * 0.5
    f_drift = f_noise = True if preconditioned else None
    out = {"scaled_grad": [], "localization": [], "weight_decay": []}
    for t in terms:
        out[t.component].append((half_lr * f32(t.coef),
                                 _key(t.base, f_drift)))
    out["unscaled_grad"] = [(half_lr * f32(nb), _key(terms_lib.GRAD, None))]
    noise_scale = jnp.sqrt(f32(lr)) * f32(noise_level)
    if noise_mult is not None:
        noise_scale = noise_scale * jnp.sqrt(f32(noise_mult))
    out["noise"] = [(noise_scale, _key(NOISE, f_noise))]
    out["distance"] = ([(f32(1.0), _key(terms_lib.DISPLACEMENT, None))]
                       if has_displacement else [])
    return out


def _numel(p_leaves, m_leaves):
    """The number of unmasked params (a Python int without masks)."""
    return sum(int(np.size(p)) if m is None
               else jnp.count_nonzero(m).astype(jnp.int32)
               for p, m in zip(p_leaves, m_leaves))


def _sketch(cs: CountSketch, comps: dict, vectors: list) -> SketchBuffer:
    """Sketches the components from the sketches of their vectors.

    A count sketch is linear, so each vector is sketched once (leaves
    concatenated in flatten order) and each component is the sum of its
    scales times its vectors' sketches.
    """
    names = metrics_lib.SKETCHED
    keys = list(dict.fromkeys(k for n in names for _, k in comps[n]))
    sketches = dict(zip(keys, cs._sketch_concatenated(
        [[vecs[k] for k in keys] for vecs in vectors])))
    zero = jnp.zeros((cs.output_dim,), jnp.float32)

    def component(n):
        out = None
        for scale, k in comps[n]:
            x = sketches[k] * scale
            out = x if out is None else out + x
        return zero if out is None else out

    return SketchBuffer(**{n: component(n) for n in names})


def find_states(opt_state) -> list:
    """Every sampler state inside a (composed) optax state."""
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=is_sampler_state)
    return [x for x in nodes if is_sampler_state(x)]
