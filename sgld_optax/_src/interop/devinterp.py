"""devinterp's optimizer state and count sketches, to and from the samplers here.

devinterp 2.0.1's `SGLD`, `SGMCMC.sgld` and `SGMCMC.rmsprop_sgld` state
moves to `sgld_optax.sgld` and `sgld_optax.rmsprop_sgld` state and back, and
devinterp's count-sketch tables are rebuilt exactly.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgld_optax._src.interop.checkpoints import (
    _is_module, _is_tensor, _loaded_torch, _numpy_dtype_of, _numpy_to_tensor,
    _require_torch, _tensor_to_numpy)
from sgld_optax._src.interop.rules import (
    _default_layout, _flax_entry, _fmt_path, _leaf_to_numpy, _match,
    _mismatch_error, _module_kinds, _path_tokens, _shape, _torch_entry)
from sgld_optax._src.sketch import CountSketch

PyTree = Any


# ---------------------------------------------------------------------------
# Sampler state (devinterp SGLD / SGMCMC <-> sgld_optax samplers)
# ---------------------------------------------------------------------------

_SUPPORTED = ("devinterp's SGLD (devinterp.optim.sgld.SGLD), SGMCMC.sgld and "
              "SGMCMC.rmsprop_sgld (devinterp.optim.sgmcmc.SGMCMC)")

# Sampler argument -> devinterp param-group field, and default.
_HPARAMS = (
    ("learning_rate", "lr", None),
    ("nbeta", "nbeta", 1.0),
    ("noise_level", "noise_level", 1.0),
    ("weight_decay", "weight_decay", 0.0),
    ("localization", "localization", 0.0),
    ("bounding_box_size", "bounding_box_size", None),
)
# rmsprop_sgld's own arguments, and defaults.
_RMSPROP_HPARAMS = (
    ("alpha", 0.99),
    ("eps", 0.1),
    ("initial_square_avg", 0.0),
    ("bias_correction", False),
)
# The fields every param group of devinterp's SGLD has.
_SGLD_FIELDS = ("lr", "nbeta", "noise_level", "weight_decay", "localization",
                "bounding_box_size")


class _DevinterpGroup(NamedTuple):
    """One devinterp param group, in the terms of the samplers here."""

    lr: float
    nbeta: float
    noise_level: float
    weight_decay: float
    localization: float
    bounding_box_size: Optional[float]   # None: no box
    has_mask: bool
    masks: Optional[list]                # SGMCMC: one mask per parameter
    alpha: Optional[float]               # RMSprop only
    eps: Optional[float]                 # RMSprop only
    center_keys: tuple                   # SGMCMC: state keys holding w0
    metrics: Any


class _DevinterpOptimizer(NamedTuple):
    kind: str      # "SGLD" or "SGMCMC"
    sampler: str   # "sgld" or "rmsprop_sgld"
    groups: list

    @property
    def name(self) -> str:
        return "SGLD" if self.kind == "SGLD" else f"SGMCMC.{self.sampler}"


def _unsupported(what: str) -> ValueError:
    return ValueError(f"Unsupported optimizer: {what}. Supported are "
                      f"{_SUPPORTED}.")


def _type_name(x) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _devinterp_state_dict(optimizer) -> Mapping:
    """The state dict of a devinterp optimizer, or the state dict given."""
    torch = _loaded_torch()
    if torch is not None and isinstance(optimizer, torch.optim.Optimizer):
        try:
            # pylint: disable=import-outside-toplevel
            from devinterp.optim.sgld import SGLD
            from devinterp.optim.sgmcmc import SGMCMC
            # pylint: enable=import-outside-toplevel
            supported = (SGLD, SGMCMC)
        except ImportError:
            supported = ()
        if not isinstance(optimizer, supported):
            raise _unsupported(_type_name(optimizer))
        return optimizer.state_dict()
    if (not isinstance(optimizer, Mapping) or "state" not in optimizer
            or "param_groups" not in optimizer):
        raise ValueError(
            "Expected a devinterp optimizer or its state dict, with 'state' "
            "and 'param_groups' (from optimizer.state_dict()); supported are "
            f"{_SUPPORTED}.")
    return optimizer


def _read_devinterp(sd: Mapping) -> _DevinterpOptimizer:
    """Recognises the devinterp optimizer behind a state dict."""
    groups = list(sd["param_groups"])
    if not groups:
        raise ValueError("The optimizer state dict has no param groups.")
    read = []
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping) or "params" not in g:
            raise ValueError(f"devinterp param group {gi} is malformed.")
        if "prior" in g or "preconditioner" in g:
            read.append(("SGMCMC",) + _read_sgmcmc_group(g, gi))
        elif all(k in g for k in _SGLD_FIELDS):
            read.append(("SGLD", "sgld", _read_sgld_group(g)))
        else:
            fields = sorted(k for k in g if k != "params")
            raise _unsupported(
                f"param group {gi} has the fields {fields}, those of neither "
                "devinterp's SGLD nor its SGMCMC")
    kinds = {(k, s) for k, s, _ in read}
    if len(kinds) != 1:
        raise _unsupported("its param groups belong to different samplers "
                           f"{sorted(kinds)}")
    (kind, sampler), = kinds
    return _DevinterpOptimizer(kind, sampler, [g for _, _, g in read])


def _read_sgld_group(g) -> _DevinterpGroup:
    box = g["bounding_box_size"]
    return _DevinterpGroup(
        lr=float(g["lr"]), nbeta=float(g["nbeta"]),
        noise_level=float(g["noise_level"]),
        weight_decay=float(g["weight_decay"]),
        localization=float(g["localization"]),
        bounding_box_size=float(box) if box else None,  # SGLD: 0 is no box
        has_mask=g.get("mask") is not None, masks=None, alpha=None, eps=None,
        center_keys=(), metrics=g.get("metrics"))


def _read_sgmcmc_group(g, gi) -> tuple:
    """``(sampler, _DevinterpGroup)`` of an ``SGMCMC`` param group."""
    # pylint: disable=import-outside-toplevel
    from devinterp.optim import preconditioner as di_pre
    from devinterp.optim import prior as di_prior
    # pylint: enable=import-outside-toplevel
    for field in ("lr", "nbeta", "noise_level", "bounding_box_size", "prior",
                  "preconditioner"):
        if field not in g:
            raise ValueError(f"{field}: missing from devinterp param group {gi}.")
    pre = g["preconditioner"]
    parts = (list(pre.preconditioners)
             if type(pre) is di_pre.CompositePreconditioner else [pre])
    rms, masks = None, None
    for part in parts:
        if type(part) is di_pre.IdentityPreconditioner:
            continue
        if type(part) is di_pre.MaskPreconditioner and masks is None:
            masks = list(part.masks)
        elif (type(part) is di_pre.RMSpropPreconditioner and rms is None
              and not part.add_grad_correction):
            rms = part
        elif type(part) is di_pre.NHTPreconditioning:
            raise _unsupported(f"param group {gi} has the preconditioner "
                               f"{part!r} of SGMCMC.sgnht")
        else:
            raise _unsupported(f"param group {gi} has the custom "
                               f"preconditioner {_type_name(part)}")
    prior = g["prior"]
    if prior is None:
        priors = []
    elif type(prior) is di_prior.CompositePrior:
        priors = list(prior.priors)
    else:
        priors = [prior]
    for p in priors:
        if type(p) is not di_prior.GaussianPrior or not (
                p.center is None or (isinstance(p.center, str)
                                     and p.center == "initial")):
            if type(p) is not di_prior.GaussianPrior:
                what = f"the prior {_type_name(p)}"
            elif isinstance(p.center, (list, tuple)):
                what = "a GaussianPrior with given centres"
            else:
                what = f"a GaussianPrior centred at {p.center!r}"
            raise _unsupported(
                f"param group {gi} has {what}; only Gaussian priors centred "
                "at 0 (weight_decay) or at the initial parameters "
                "(localization) have a counterpart")
    box = g["bounding_box_size"]
    group = _DevinterpGroup(
        lr=float(g["lr"]), nbeta=float(g["nbeta"]),
        noise_level=float(g["noise_level"]),
        weight_decay=float(sum(p.localization for p in priors
                               if p.center is None)),
        localization=float(sum(p.localization for p in priors
                               if p.center is not None)),
        bounding_box_size=None if box is None else float(box),
        has_mask=masks is not None, masks=masks,
        alpha=None if rms is None else float(rms.alpha),
        eps=None if rms is None else float(rms.eps),
        center_keys=tuple(p.key for p in priors if p.center is not None),
        metrics=g.get("metrics"))
    return ("rmsprop_sgld" if rms is not None else "sgld"), group


def _sampler_name(state) -> str:
    """``"sgld"``, ``"rmsprop_sgld"``, ``"sghmc"`` or ``"sgnht"``."""
    # pylint: disable=import-outside-toplevel
    from sgld_optax._src.samplers.rmsprop_sgld import RMSpropSGLDState
    from sgld_optax._src.samplers.sghmc import SGHMCState
    from sgld_optax._src.samplers.sgld import SGLDState
    from sgld_optax._src.samplers.sgnht import SGNHTState
    # pylint: enable=import-outside-toplevel
    for cls, name in ((SGLDState, "sgld"), (RMSpropSGLDState, "rmsprop_sgld"),
                      (SGHMCState, "sghmc"), (SGNHTState, "sgnht")):
        if isinstance(state, cls):
            return name
    return type(state).__name__


def _sampler_hyperparams(tx, hyperparams, sampler: str) -> dict:
    """The hyperparameters of the sampler whose state is of ``sampler``."""
    known = ({n for n, _, _ in _HPARAMS} | {n for n, _ in _RMSPROP_HPARAMS}
             | {"mask", "sampler", "priors"})
    if hyperparams is not None:
        if not isinstance(hyperparams, Mapping):
            raise TypeError("hyperparams must be a mapping of sampler argument "
                            f"names to values, got {type(hyperparams).__name__}.")
        unknown = sorted(set(hyperparams) - known)
        if unknown:
            raise TypeError(f"Unknown hyperparameters {unknown}; expected some "
                            f"of {sorted(known)}.")
        if "learning_rate" not in hyperparams:
            raise TypeError("hyperparams must give learning_rate.")
        source = hyperparams
    else:
        if tx is None:
            raise TypeError("Pass tx (built by sgld_optax.sgld or "
                            "sgld_optax.rmsprop_sgld) or hyperparams=.")
        source = getattr(getattr(tx, "update", None), "hyperparams", None)
        if not isinstance(source, Mapping):
            raise TypeError(
                "Could not read the hyperparameters of tx; this works for the "
                "transformation returned by sgld_optax.sgld or "
                "sgld_optax.rmsprop_sgld itself. For a composed or wrapped "
                "transformation pass hyperparams=dict(learning_rate=..., "
                "nbeta=..., noise_level=..., weight_decay=..., "
                "localization=..., bounding_box_size=...), plus alpha= and "
                "eps= for rmsprop_sgld.")
    out = {n: source.get(n, d) for n, _, d in _HPARAMS}
    out.update({n: source.get(n, d) for n, d in _RMSPROP_HPARAMS})
    out["mask"] = source.get("mask")
    out["priors"] = tuple(source.get("priors", ()))
    out["sampler"] = source.get("sampler", sampler)
    if out["sampler"] != sampler:
        raise ValueError(f"sampler: the hyperparameters are those of "
                         f"{out['sampler']!r}, the state is {sampler!r}'s.")
    return out


def _check_translatable(hp) -> None:
    """Raises unless the sampler of ``hp`` has a devinterp counterpart."""
    sampler = hp["sampler"]
    if sampler not in ("sgld", "rmsprop_sgld"):
        raise ValueError(
            f"The sampler is {sampler}, which has no counterpart among the "
            f"devinterp optimizers supported here ({_SUPPORTED}); only "
            "sgld_optax.sgld and sgld_optax.rmsprop_sgld states can be moved.")
    if hp["priors"]:
        raise ValueError(
            f"The sampler has {len(hp['priors'])} prior(s) given by priors=, "
            "which the devinterp optimizers supported here cannot express: "
            "they take weight_decay and localization only.")
    if sampler == "rmsprop_sgld":
        bad = []
        v0 = _hparam_value(hp["initial_square_avg"], 0)
        if v0 != 0:
            bad.append(f"initial_square_avg={v0!r}")
        if bool(hp["bias_correction"]):
            bad.append("bias_correction=True")
        if bad:
            raise ValueError(
                f"rmsprop_sgld with {' and '.join(bad)} has no devinterp "
                "equivalent: SGMCMC.rmsprop_sgld starts its running mean of "
                "squared gradients at 0 and does not correct its bias.")


def _hparam_value(value, count):
    """A concrete Python value (schedules evaluated at ``count``), or None."""
    if value is None:
        return None
    if callable(value):
        value = value(jnp.asarray(count, jnp.int32))
    return float(np.asarray(jax.device_get(value)))


def _check_groups(di: _DevinterpOptimizer, hp, count) -> None:
    problems = []
    if di.sampler != hp["sampler"]:
        problems.append(f"sampler: the devinterp optimizer is {di.name}, tx is "
                        f"sgld_optax.{hp['sampler']}")
    compared = [(n, theirs) for n, theirs, _ in _HPARAMS
                if n != "bounding_box_size"]
    if di.sampler == hp["sampler"] == "rmsprop_sgld":
        compared += [("alpha", "alpha"), ("eps", "eps")]
    for gi, g in enumerate(di.groups):
        for ours, theirs in compared:
            a = _hparam_value(hp[ours], count)
            b = getattr(g, theirs)
            if not math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0):
                problems.append(f"{theirs}: devinterp param group {gi} has "
                                f"{b!r}, tx has {ours}={a!r}")
        a = _hparam_value(hp["bounding_box_size"], count)
        if di.kind == "SGLD":
            a = a or None   # devinterp's SGLD treats 0 and None as no box
        b = g.bounding_box_size
        if not ((a is None) == (b is None) and (
                a is None or math.isclose(a, b, rel_tol=1e-6))):
            problems.append(f"bounding_box_size: devinterp param group {gi} "
                            f"has {b!r}, tx has bounding_box_size={a!r}")
        if g.has_mask != (hp.get("mask") is not None):
            problems.append(f"mask: devinterp param group {gi} "
                            f"{'has' if g.has_mask else 'has no'} mask, tx "
                            f"{'has' if hp.get('mask') is not None else 'has none'}")
    if problems:
        raise ValueError("Hyperparameters differ between the devinterp "
                         "optimizer and tx:\n  " + "\n  ".join(problems))


def _one_sampler_state(opt_state):
    from sgld_optax._src.core.step import find_states  # pylint: disable=import-outside-toplevel
    states = find_states(opt_state)
    if len(states) != 1:
        raise ValueError(f"Expected exactly one sampler state (sgld, "
                         f"rmsprop_sgld, ...) inside the optax state, found "
                         f"{len(states)}.")
    return states[0]


def _replace_sampler_state(opt_state, new):
    from sgld_optax._src.core.step import is_sampler_state  # pylint: disable=import-outside-toplevel
    return jax.tree_util.tree_map(lambda x: new if is_sampler_state(x) else x,
                                  opt_state, is_leaf=is_sampler_state)


class _Names(NamedTuple):
    """The torch parameters a devinterp optimizer holds, in its order."""

    names: Optional[list]    # None: not given
    named: Optional[dict]    # name -> tensor, when a module gave them
    kinds: Optional[dict]    # name -> module kind, when a torch module gave them


def _param_names(module, names) -> _Names:
    """Torch parameter names in optimizer order, from `module` or `names`."""
    if names is not None:
        if module is not None:
            raise TypeError("Pass module= or names=, not both.")
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError("names must be a sequence of parameter names.")
        return _Names(list(names), None, None)
    if module is None:
        return _Names(None, None, None)
    kinds = None
    if _is_module(module):
        named = list(module.named_parameters())
        kinds = _module_kinds(module, [n for n, _ in named])
    elif isinstance(module, Mapping):
        named = list(module.items())
    else:
        raise TypeError("module must be a torch.nn.Module or a mapping of "
                        f"parameter names to tensors, got {type(module).__name__}.")
    return _Names([n for n, _ in named], {n: t for n, t in named}, kinds)


def _pair_params(params, names, kinds=None):
    """Matches torch parameter names to the leaves of a Flax params tree.

    Returns `(pairs, flat, tokens)`: `pairs` lists `(name, leaf index,
    layout)` in `names` order, the layout decided as in `params_from_torch`
    (by `kinds`, the module types, when given); a single leaf and no names
    make one pair named `"<param>"`. `flat` is
    `tree_flatten_with_path(params)[0]`; `tokens` the leaves' path tokens.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    tokens = [_path_tokens(p) for p, _ in flat]
    if names is None:
        if len(flat) == 1:
            layout = _default_layout(tokens[0][-1], len(_shape(flat[0][1])),
                                     None)
            return [("<param>", 0, layout)], flat, tokens
        raise TypeError(
            "The params have several leaves: pass module= (the torch module "
            "whose parameters() the devinterp optimizer was built on) or "
            "names= (its parameter names in that order) to pair them.")
    entries = {i: _flax_entry(t, False) for i, t in enumerate(tokens)}
    if any(_torch_entry(n) is None or _torch_entry(n).coll != "params"
           for n in names):
        raise ValueError("names must name parameters, not buffers.")
    pairs, t_left, f_left = _match(names, entries)
    if t_left or f_left:
        raise _mismatch_error(
            "The torch parameters do not match the params",
            [(n, "?") for n in t_left],
            [(_fmt_path(tokens[i]), _shape(flat[i][1])) for i in f_left], [])
    kinds = kinds or {}
    out, undecided = [], []
    for n in names:
        i = pairs[n]
        layout = _default_layout(tokens[i][-1], len(_shape(flat[i][1])),
                                 kinds.get(n))
        if isinstance(layout, str):
            undecided.append(
                f"layout undecided: {n} -> {_fmt_path(tokens[i])}: {layout}; "
                "pass names= instead of module= to read it as an nn.Linear "
                "weight")
        out.append((n, i, layout))
    if undecided:
        raise _mismatch_error("The torch parameters do not match the params",
                              other=undecided)
    return out, flat, tokens


def _torch_value(t, name) -> np.ndarray:
    return _tensor_to_numpy(t, name) if _is_tensor(t) else np.asarray(t)


def _w0_source(pstate: Mapping, group: _DevinterpGroup, name: str):
    """The tensor holding a parameter's $w_0$ in devinterp's state, or None.

    ``SGMCMC`` keeps the localization centre under its prior's key and,
    with a bounding box or metrics, ``initial_param``; both hold the initial
    parameters and must agree.
    """
    found = [(k, pstate.get(k)) for k in group.center_keys + ("initial_param",)]
    found = [(k, v) for k, v in found if v is not None]
    if not found:
        return None
    first = _torch_value(found[0][1], name)
    for k, v in found[1:]:
        other = _torch_value(v, name)
        if other.shape != first.shape or not np.array_equal(other, first):
            raise ValueError(
                f"{name}: devinterp's {found[0][0]!r} and {k!r} differ, but "
                "the sampler state keeps a single w0 for both localization "
                "and the bounding box.")
    return first


def sgld_state_from_torch(
    devinterp_optimizer_state_dict: Any,
    params: PyTree,
    tx: Optional[optax.GradientTransformation],
    *,
    module: Optional[Any] = None,
    names: Optional[Sequence[str]] = None,
    count: int = 0,
    key: Optional[Any] = None,
    hyperparams: Optional[Mapping[str, Any]] = None,
) -> optax.OptState:
    r"""Builds `sgld` or `rmsprop_sgld` state from a devinterp optimizer.

    Three devinterp 2.0.1 optimizers are supported, each with its
    counterpart here:

    | devinterp | here | state |
    |---|---|---|
    | `SGLD` (`devinterp.optim.sgld`, deprecated there) | `sgld` | `SGLDState` |
    | `SGMCMC.sgld` (`devinterp.optim.sgmcmc`) | `sgld` | `SGLDState` |
    | `SGMCMC.rmsprop_sgld` | `rmsprop_sgld` | `RMSpropSGLDState` |

    The result is `tx.init(params)` with devinterp's initial parameters
    $w_0$ (converted to Flax layout) as `initial_params`, `count` as the
    step count, RMSprop's running mean of squared gradients as `square_avg`
    (zero before devinterp's first step), and, when both sides record
    metrics, devinterp's last metrics. Continuing the chain with `tx.update`
    then takes the same steps as continuing it in devinterp (the noise
    differs: the random streams are not shared).

    devinterp's `SGLD` keeps $w_0$ as `initial_param`. `SGMCMC` keeps it as
    the centre of its localization prior (`prior_center_<i>`, the key of
    that `GaussianPrior` inside the `CompositePrior`) and, with a bounding
    box or metrics, as `initial_param`; where both are there they must
    agree.

    The hyperparameters of every devinterp param group are checked against
    those of `tx` (schedules evaluated at `count`): `lr`, `nbeta`,
    `noise_level`, `weight_decay` and `localization` (for `SGMCMC`, the
    precisions of its Gaussian priors centred at 0 and at $w_0$),
    `bounding_box_size`, RMSprop's `alpha` and `eps`, the sampler itself,
    and whether a mask is set; for `SGMCMC`, the masks of its
    `MaskPreconditioner` must equal the mask of `tx` element by element.

    devinterp orders its state by `module.parameters()`; pass `module` (or
    `names`) so that each tensor finds its Flax leaf through the same naming
    rules as `params_from_torch`. A model with a single parameter needs
    neither.

    Args:
      devinterp_optimizer_state_dict: a supported devinterp optimizer, or
        its `state_dict()` (`'state'` and `'param_groups'`).
      params: the Flax params the chain continues from (the `params`
        collection only).
      tx: the transformation returned by `sgld_optax.sgld` or
        `sgld_optax.rmsprop_sgld`, possibly inside `optax.chain` and the
        like (then pass `hyperparams`).
      module: the `torch.nn.Module` whose `parameters()` the optimizer was
        built on, or a mapping of its parameter names to tensors in that
        order (such as `dict(module.named_parameters())`).
      names: alternatively, the parameter names in optimizer order.
      count: the step count to store (devinterp does not keep one).
      key: optional PRNG key or int seed replacing the key of `tx.init`.
      hyperparams: optional mapping of sampler argument names to values
        (`learning_rate`, `nbeta`, `noise_level`, `weight_decay`,
        `localization`, `bounding_box_size`, `mask`; `alpha`, `eps`,
        `initial_square_avg`, `bias_correction` for `rmsprop_sgld`), used
        instead of reading them from `tx`.

    Returns:
      The optax state, with the structure of `tx.init(params)`.

    Raises:
      ValueError: if the optimizer is not one of the three above (such as
        `SGMCMC.sgnht`, `torch.optim.SGD` or an `SGMCMC` with a custom
        preconditioner or prior; the message names the supported ones), if
        `tx` is a sampler without devinterp counterpart (`sghmc`, `sgnht`,
        or `rmsprop_sgld` with `initial_square_avg` $\ne 0$ or
        `bias_correction=True`), if a hyperparameter differs (the message
        names the field), or if the state dict is malformed or lacks $w_0$.
      CheckpointMismatchError: if tensor names or shapes do not line up.
      TypeError: if the pairing of parameters cannot be decided.

    Examples:
      >>> import torch, warnings
      >>> import sgld_optax as so
      >>> from sgld_optax import torch_interop
      >>> from devinterp.optim.sgmcmc import SGMCMC
      >>> lin = torch.nn.Linear(3, 2)
      >>> opt = SGMCMC.rmsprop_sgld(lin.parameters(), lr=1e-3, nbeta=10.0,
      ...                           localization=1.0)
      >>> params = torch_interop.params_from_torch(lin)
      >>> tx = so.rmsprop_sgld(1e-3, nbeta=10.0, localization=1.0, key=0)
      >>> state = torch_interop.sgld_state_from_torch(
      ...     opt, params, tx, module=lin)
      >>> type(state).__name__
      'RMSpropSGLDState'
    """
    sd = _devinterp_state_dict(devinterp_optimizer_state_dict)
    di = _read_devinterp(sd)
    groups = list(sd["param_groups"])
    indices = [i for g in groups for i in g["params"]]
    positions = [(gi, j) for gi, g in enumerate(groups)
                 for j in range(len(g["params"]))]

    if tx is None:
        raise TypeError("Pass tx, the transformation whose state to build.")
    opt_state = tx.init(params)
    state = _one_sampler_state(opt_state)
    hp = _sampler_hyperparams(tx, hyperparams, _sampler_name(state))
    _check_translatable(hp)
    _check_groups(di, hp, count)

    names, _, kinds = _param_names(module, names)
    if names is not None and len(names) != len(indices):
        raise ValueError(f"The optimizer has {len(indices)} parameters but "
                         f"{len(names)} names were given.")
    pairs, flat, tokens = _pair_params(params, names, kinds)
    if names is None and len(indices) != 1:
        raise ValueError(f"The optimizer has {len(indices)} parameters, the "
                         "params one leaf.")
    treedef = jax.tree_util.tree_structure(params)
    sd_state = sd["state"]

    def read_leaves(what, like_leaves, get, required):
        """Per Flax leaf, ``get(param state, group, position, name)`` in
        Flax layout and the dtype of ``like_leaves``; None where absent."""
        out = [None] * len(flat)
        missing, mismatched = [], []
        for (name, leaf_i, layout), idx, (gi, j) in zip(pairs, indices,
                                                        positions):
            src = get(sd_state.get(idx, {}), di.groups[gi], j, name)
            like = like_leaves[leaf_i]
            if src is None:
                if required:
                    missing.append((name, _shape(like)))
                continue
            arr = layout._to_flax(src)[0]  # pylint: disable=protected-access
            if arr.shape != _shape(like):
                mismatched.append((name, _fmt_path(tokens[leaf_i]), src.shape,
                                   arr.shape, _shape(like)))
                continue
            x = jnp.asarray(arr.astype(like.dtype, copy=False))
            if isinstance(like, jax.Array):
                x = jax.device_put(x, like.sharding)
            out[leaf_i] = x
        if missing or mismatched:
            raise _mismatch_error(
                f"The devinterp state does not match the params ({what})",
                missing, [], mismatched)
        return out

    new = {}
    if state.initial_params is not None:
        w0 = read_leaves(
            "tx needs initial params", treedef.flatten_up_to(
                state.initial_params),
            lambda ps, g, j, name: _w0_source(ps, g, name), required=True)
        new["initial_params"] = jax.tree_util.tree_unflatten(treedef, w0)
    if hp["sampler"] == "rmsprop_sgld":
        init_v = treedef.flatten_up_to(state.square_avg)
        v = read_leaves(
            "square_avg", init_v,
            lambda ps, g, j, name: (None if ps.get("square_avg") is None
                                    else _torch_value(ps["square_avg"], name)),
            required=False)
        new["square_avg"] = jax.tree_util.tree_unflatten(
            treedef, [x if x is not None else v0 for x, v0 in zip(v, init_v)])
    if di.kind == "SGMCMC" and hp["mask"] is not None:
        ours = treedef.flatten_up_to(hp["mask"])
        theirs = read_leaves(
            "mask", [np.asarray(m, np.float32) for m in ours],
            lambda ps, g, j, name: _torch_value(g.masks[j], name).astype(
                np.float32), required=True)
        differ = [_fmt_path(tokens[i]) for i, (a, b) in enumerate(zip(ours, theirs))
                  if not np.array_equal(np.asarray(a, np.float32), np.asarray(b))]
        if differ:
            raise ValueError("Hyperparameters differ between the devinterp "
                             "optimizer and tx:\n  mask: the devinterp masks of "
                             f"{', '.join(differ)} differ from those of tx")
    if state.metrics is not None:
        torch_metrics = [g.metrics for g in di.groups if g.metrics is not None]
        if torch_metrics:
            new["metrics"] = _metrics_from_devinterp(torch_metrics)
    new["count"] = jnp.asarray(count, jnp.int32)
    if key is not None:
        from sgld_optax._src.base import as_key  # pylint: disable=import-outside-toplevel
        new["key"] = as_key(key)
    return _replace_sampler_state(opt_state, state._replace(**new))


def _metrics_from_devinterp(group_metrics):
    from sgld_optax._src.metrics import Metrics  # pylint: disable=import-outside-toplevel
    norm = ("scaled_grad", "unscaled_grad", "localization", "weight_decay",
            "noise", "distance")
    dots = ("dot_grad_prior", "dot_grad_noise", "dot_prior_noise")
    val = lambda m, f: float(np.asarray(_tensor_to_numpy(getattr(m, f), f)
                                        if _is_tensor(getattr(m, f))
                                        else getattr(m, f)).reshape(-1)[0])
    out = {f: jnp.float32(math.sqrt(sum(val(m, f) ** 2 for m in group_metrics)))
           for f in norm}
    out.update({f: jnp.float32(sum(val(m, f) for m in group_metrics))
                for f in dots})
    out["numel"] = jnp.int32(sum(int(m.numel) for m in group_metrics))
    return Metrics(**out)


def _tree_to_torch(tree, pnames: _Names, what, dtype=None) -> list:
    """The leaves of a Flax tree as torch tensors in the order and layout of
    the parameters `pnames`, with their dtypes (or `dtype`)."""
    named = pnames.named
    pairs, flat, tokens = _pair_params(tree, pnames.names, pnames.kinds)
    tensors, mismatched = [], []
    for name, leaf_i, layout in pairs:
        arr = layout._to_torch([_leaf_to_numpy(flat[leaf_i][1])])  # pylint: disable=protected-access
        if named is not None:
            ref = named[name]
            if tuple(ref.shape) != arr.shape:
                mismatched.append((_fmt_path(tokens[leaf_i]), name,
                                   _shape(flat[leaf_i][1]), arr.shape,
                                   tuple(ref.shape)))
                continue
            if dtype is None and _is_tensor(ref):
                arr = arr.astype(_numpy_dtype_of(ref), copy=False)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        tensors.append(_numpy_to_tensor(arr))
    if mismatched:
        raise _mismatch_error(f"The {what} do not match the torch module",
                              [], [], mismatched)
    return tensors


def sgld_state_to_torch(
    state: optax.OptState,
    tx: Optional[optax.GradientTransformation] = None,
    *,
    module: Optional[Any] = None,
    names: Optional[Sequence[str]] = None,
    params: Optional[PyTree] = None,
    hyperparams: Optional[Mapping[str, Any]] = None,
    target: Optional[str] = None,
) -> "dict[str, Any]":
    r"""Builds a devinterp optimizer state dict from `sgld` or `rmsprop_sgld` state.

    `target` picks the devinterp optimizer the result is for:

    - `"SGLD"` (the default for `sgld` state): devinterp's `SGLD`
      (deprecated there). Load it with
      `SGLD(module.parameters(), ...).load_state_dict(result)`.
    - `"SGMCMC"` (the default for `rmsprop_sgld` state, and the only choice
      for it): `SGMCMC.sgld` for `sgld` state, `SGMCMC.rmsprop_sgld` for
      `rmsprop_sgld` state. Load it with, e.g.,
      `SGMCMC.rmsprop_sgld(module.parameters(), ...).load_state_dict(result)`.

    The result has a single param group holding every parameter, in the
    order of `module.parameters()` (or `names`), with the hyperparameters of
    `tx` (schedules evaluated at the state's step count). As with any
    PyTorch optimizer, what the dict holds replaces what the optimizer was
    built with, hyperparameters included.

    For `SGLD` the group holds `lr`, `noise_level`, `weight_decay`,
    `localization`, `nbeta`, `bounding_box_size` and `num_el`, and each
    parameter's state its `initial_param` $w_0$ in PyTorch layout.

    For `SGMCMC` the group holds `lr`, `noise_level`, `nbeta`,
    `bounding_box_size` (`None` without a box), `mask` and, as devinterp's
    factories build them, the `prior` (a `CompositePrior` of a
    `GaussianPrior` centred at 0 of precision `weight_decay`, when
    positive, then one centred at $w_0$ of precision `localization`, when
    positive) and the `preconditioner` (identity or
    `RMSpropPreconditioner(alpha, eps)`, combined with a
    `MaskPreconditioner` holding the mask in PyTorch layout when `tx` has
    one). Each parameter's state holds `param_idx`, $w_0$ under the
    localization prior's key (`prior_center_<i>`) and, with a bounding box
    or metrics, as `initial_param`, and for `rmsprop_sgld` the running mean
    `square_avg`. Building these objects needs devinterp installed.

    When the state records metrics, a devinterp `Metrics` object is added
    to the group so an optimizer built with `save_metrics=True` can keep
    stepping. The PRNG key, step count and sketch buffer have no devinterp
    counterpart and are not carried.

    Args:
      state: an optax state containing exactly one `SGLDState` or
        `RMSpropSGLDState`.
      tx: the transformation returned by `sgld_optax.sgld` or
        `sgld_optax.rmsprop_sgld`.
      module: the `torch.nn.Module` the devinterp optimizer is built on, or
        a mapping of its parameter names to tensors in order; gives names,
        order, shapes and dtypes.
      names: alternatively, the parameter names in order.
      params: the current Flax params, used as $w_0$ when the state keeps
        no initial params but the target needs them (devinterp's `SGLD`
        needs an `initial_param` for every parameter), and to enumerate the
        parameters of an `SGMCMC.sgld` state with nothing else to export.
      hyperparams: optional mapping of sampler argument names to values
        (as for `sgld_state_from_torch`), used instead of reading them from
        `tx`.
      target: `"SGLD"`, `"SGMCMC"` or `None` (the default for the sampler).

    Returns:
      A dict with `'state'` and `'param_groups'` that the target's
      `load_state_dict` accepts.

    Raises:
      ValueError: if the sampler has no devinterp counterpart (`sghmc`,
        `sgnht`, or `rmsprop_sgld` with `initial_square_avg` $\ne 0$ or
        `bias_correction=True`), if `target` is unknown or is `"SGLD"` for
        `rmsprop_sgld` state, if there are no initial params to export, or
        if `tx` uses a mask and the target is `SGLD` (its masks cover whole
        param groups).
      CheckpointMismatchError: if tensor names or shapes do not line up.
      ImportError: if torch (or, for metrics or `SGMCMC`, devinterp) is not
        installed.

    Examples:
      >>> import jax.numpy as jnp, torch
      >>> import sgld_optax as so
      >>> from sgld_optax import torch_interop
      >>> lin = torch.nn.Linear(3, 2)
      >>> params = torch_interop.params_from_torch(lin)
      >>> tx = so.sgld(1e-3, nbeta=10.0, localization=1.0, key=0)
      >>> sd = torch_interop.sgld_state_to_torch(tx.init(params), tx, module=lin)
      >>> sorted(sd)
      ['param_groups', 'state']
    """
    torch = _require_torch("sgld_state_to_torch")
    st = _one_sampler_state(state)
    hp = _sampler_hyperparams(tx, hyperparams, _sampler_name(st))
    _check_translatable(hp)
    sampler = hp["sampler"]
    if target is None:
        target = "SGLD" if sampler == "sgld" else "SGMCMC"
    if target not in ("SGLD", "SGMCMC"):
        raise ValueError(f"target must be 'SGLD' or 'SGMCMC', got {target!r}.")
    if target == "SGLD" and sampler != "sgld":
        raise ValueError(f"devinterp's SGLD has no counterpart of {sampler}; "
                         "use target='SGMCMC'.")
    count = int(np.asarray(jax.device_get(st.count)).reshape(-1)[0])
    value = lambda n: _hparam_value(hp[n], count)
    pnames = _param_names(module, names)

    w0 = st.initial_params
    if target == "SGLD":
        if hp.get("mask") is not None:
            raise ValueError("tx uses a mask, which devinterp's SGLD cannot "
                             "express per element; use target='SGMCMC'.")
        need_w0 = True
    else:
        need_w0 = (bool(value("localization")) or st.metrics is not None
                   or hp["bounding_box_size"] is not None)
    if w0 is None and need_w0:
        if params is None:
            raise ValueError(
                "The state keeps no initial params (tx has no localization, "
                "bounding box, metrics or sketches); pass params= to use as "
                f"devinterp's {'initial_param' if target == 'SGLD' else 'w0'}.")
        w0 = params
    w0_t = _tree_to_torch(w0, pnames, "params") if need_w0 else None
    metrics = (_metrics_to_devinterp(st.metrics, torch)
               if st.metrics is not None else None)

    if target == "SGLD":
        group = {
            "lr": value("learning_rate"),
            "noise_level": value("noise_level"),
            "weight_decay": value("weight_decay"),
            "localization": value("localization"),
            "nbeta": value("nbeta"),
            "bounding_box_size": value("bounding_box_size"),
            "num_el": int(sum(t.numel() for t in w0_t)),
        }
        if metrics is not None:
            group["metrics"] = metrics
        group["params"] = list(range(len(w0_t)))
        return {"state": {i: {"initial_param": t} for i, t in enumerate(w0_t)},
                "param_groups": [group]}

    try:
        # pylint: disable=import-outside-toplevel
        from devinterp.optim import preconditioner as di_pre
        from devinterp.optim import prior as di_prior
        # pylint: enable=import-outside-toplevel
    except ImportError as err:
        raise ImportError("Exporting to devinterp's SGMCMC needs devinterp "
                          "installed (pip install devinterp).") from err
    sq_t = (_tree_to_torch(st.square_avg, pnames, "square averages")
            if sampler == "rmsprop_sgld" else None)
    mask_t = (_tree_to_torch(jax.tree.map(lambda m: np.asarray(m, np.float32),
                                          hp["mask"]),
                             pnames, "masks", dtype=np.float32)
              if hp["mask"] is not None else None)
    n = next((len(t) for t in (w0_t, sq_t, mask_t) if t is not None), None)
    if n is None:
        if params is not None:
            n = len(_tree_to_torch(params, pnames, "params"))
        elif pnames.names is not None:
            n = len(pnames.names)
        else:
            raise ValueError("Nothing tells how many parameters there are: "
                             "pass module=, names= or params=.")
    weight_decay, localization = value("weight_decay"), value("localization")
    priors = []
    if weight_decay > 0:
        priors.append(di_prior.GaussianPrior(localization=weight_decay,
                                             center=None))
    if localization > 0:
        priors.append(di_prior.GaussianPrior(localization=localization,
                                             center="initial"))
    prior = di_prior.CompositePrior(priors)
    pre = (di_pre.RMSpropPreconditioner(alpha=value("alpha"),
                                        eps=value("eps"))
           if sampler == "rmsprop_sgld" else di_pre.IdentityPreconditioner())
    if mask_t is not None:
        pre = di_pre.CompositePreconditioner(
            [pre, di_pre.MaskPreconditioner(masks=mask_t)])
        if type(pre) is di_pre.CompositePreconditioner:
            # devinterp 2.0.1's CompositePreconditioner cannot be rebuilt by
            # copy or pickle (its __new__ needs an argument they do not
            # pass), so load_state_dict, which deep-copies the param groups,
            # and torch.load would fail; this instance tells them how.
            pre.__reduce_ex__ = functools.partial(_rebuild_composite, pre)
    box = value("bounding_box_size")
    keep_initial = box is not None or metrics is not None
    out_state = {}
    for i in range(n):
        s = {"param_idx": i,
             "initial_param": w0_t[i] if keep_initial else None}
        for p in prior.priors:
            s[p.key] = w0_t[i].clone() if p.center == "initial" else None
        if sq_t is not None:
            s["square_avg"] = sq_t[i]
        out_state[i] = s
    group = {
        "lr": value("learning_rate"),
        "noise_level": value("noise_level"),
        "nbeta": value("nbeta"),
        "prior": prior,
        "preconditioner": pre,
        "bounding_box_size": box,
        "mask": mask_t,
    }
    if metrics is not None:
        group["metrics"] = metrics
    group["params"] = list(range(n))
    return {"state": out_state, "param_groups": [group]}


def _rebuild_composite(pre, protocol):
    """How copy and pickle rebuild ``pre``: through ``__new__``'s argument,
    then its attributes (this rule included, so copies copy too)."""
    del protocol
    return type(pre), (list(pre.preconditioners),), dict(pre.__dict__)


def _metrics_to_devinterp(metrics, torch):
    try:
        from devinterp.optim.metrics import Metrics as DIMetrics  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError("Exporting metrics to devinterp needs devinterp "
                          "installed (pip install devinterp).") from err
    fields = {}
    for f in metrics._fields:
        v = np.asarray(jax.device_get(getattr(metrics, f)))
        if v.shape != ():
            raise ValueError("Cannot export metrics of several chains at once; "
                             "pick one chain's state.")
        if f == "numel":
            fields[f] = int(v)
        else:
            fields[f] = torch.tensor([float(v)], dtype=torch.float32)
    return DIMetrics(**fields)


# ---------------------------------------------------------------------------
# Count sketches
# ---------------------------------------------------------------------------


def _devinterp_tables(input_dim: int, output_dim: int, seed: int,
                      use_torch: Optional[bool] = None):
    """devinterp's hash tables, as (int64 indices, int64 signs) NumPy arrays.

    With torch, they are drawn exactly as devinterp draws them. Without it,
    the same numbers come from NumPy's MT19937, the generator behind
    ``torch.Generator`` on CPU: ``torch.randint(0, k, ...)`` for
    ``k < 2**32`` takes one 32-bit output per element, modulo ``k``, and
    ``manual_seed`` keeps the low 32 bits of the seed.
    """
    if use_torch is None:
        use_torch = importlib.util.find_spec("torch") is not None
    if use_torch:
        torch = _require_torch("devinterp_count_sketch")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, output_dim, (input_dim,), generator=gen)
        sgn = 2 * torch.randint(0, 2, (input_dim,), generator=gen) - 1
        return idx.numpy(), sgn.numpy()
    if output_dim >= 2**32:
        raise ValueError("output_dim must be < 2**32 without torch installed.")
    rs = np.random.RandomState(seed & 0xFFFFFFFF)
    raw = rs._bit_generator.random_raw(2 * input_dim)  # pylint: disable=protected-access
    idx = (raw[:input_dim] % np.uint64(output_dim)).astype(np.int64)
    sgn = 2 * (raw[input_dim:] & np.uint64(1)).astype(np.int64) - 1
    return idx, sgn


def _torch_to_jax_permutation(params, pnames: _Names):
    """`perm` with `jax_flat[j] == torch_flat[perm[j]]`.

    `torch_flat` concatenates the torch parameters `pnames` in order, each
    flattened in torch layout; `jax_flat` concatenates the leaves of
    `params` in `jax.tree_util` order, each flattened in Flax layout.
    """
    named = pnames.named
    pairs, flat, tokens = _pair_params(params, pnames.names, pnames.kinds)
    pieces = [None] * len(flat)
    offset = 0
    for name, leaf_i, layout in pairs:
        shape = _shape(flat[leaf_i][1])
        # pylint: disable-next=protected-access
        t_shape = layout._to_torch([np.empty(shape, np.bool_)]).shape
        if named is not None and tuple(named[name].shape) != t_shape:
            raise _mismatch_error(
                "The params do not match the torch module", [], [],
                [(_fmt_path(tokens[leaf_i]), name, shape, t_shape,
                  tuple(named[name].shape))])
        n = int(np.prod(t_shape, dtype=np.int64))
        t_idx = np.arange(offset, offset + n, dtype=np.int64).reshape(t_shape)
        pieces[leaf_i] = layout._to_flax(t_idx)[0].reshape(-1)  # pylint: disable=protected-access
        offset += n
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def devinterp_count_sketch(input_dim: int, output_dim: int, seed: int = 0, *,
                           params: Optional[PyTree] = None,
                           module: Optional[Any] = None,
                           names: Optional[Sequence[str]] = None
                           ) -> CountSketch:
    """The count sketch devinterp 2.0.1 builds for ``seed``, as a `CountSketch`.

    devinterp draws its bucket and sign tables from
    ``torch.Generator().manual_seed(seed)``: first
    ``torch.randint(0, output_dim, (input_dim,))``, then signs
    ``2 * torch.randint(0, 2, (input_dim,)) - 1``. This function draws the
    same tables (with torch when installed, else with NumPy's bit-identical
    MT19937) and wraps them with `CountSketch.from_tables`, so
    ``sgld_optax.sgld(..., sketch=devinterp_count_sketch(...))`` produces
    sketches directly comparable with devinterp's ``get_sketches()``.

    devinterp hashes the parameters concatenated in ``module.parameters()``
    order and torch layout, while `sgld_optax.sgld` concatenates the
    leaves in ``jax.tree_util`` order and Flax layout (kernels transposed).
    The two orders agree only for a single 1-D parameter; pass ``params``
    with ``module`` (or ``names``) to permute the tables so that each
    parameter keeps its devinterp bucket and sign, and the sketches agree
    for any model.

    Args:
      input_dim: total number of parameters.
      output_dim: number of buckets (devinterp's ``sketch_dim``).
      seed: devinterp's ``sketch_seed``.
      params: optional Flax params; with ``module`` or ``names``, reorders
        the tables from devinterp's order to this pytree's.
      module: the ``torch.nn.Module`` (or mapping of parameter names to
        tensors) the devinterp optimizer was built on.
      names: alternatively, the torch parameter names in optimizer order.

    Returns:
      A `sgld_optax.CountSketch` with explicit tables (int32 buckets,
      int8 signs).

    Raises:
      ValueError: if ``params`` do not hold ``input_dim`` numbers in all.
      TypeError: if ``params`` has several leaves and neither ``module`` nor
        ``names`` is given.

    Examples:
      >>> from sgld_optax import torch_interop
      >>> cs = torch_interop.devinterp_count_sketch(10, 4, seed=0)
      >>> int(cs.hash_indices[1]), int(cs.hash_signs[1])
      (3, -1)
    """
    for arg, v in (("input_dim", input_dim), ("output_dim", output_dim),
                   ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{arg} must be an int, got {v!r}.")
    if input_dim < 1 or output_dim < 1:
        raise ValueError("input_dim and output_dim must be >= 1.")
    if output_dim > np.iinfo(np.int32).max:
        raise ValueError("output_dim must fit in int32.")
    idx, sgn = _devinterp_tables(int(input_dim), int(output_dim), int(seed))
    if params is not None:
        total = sum(int(np.prod(_shape(x), dtype=np.int64))
                    for x in jax.tree_util.tree_leaves(params))
        if total != input_dim:
            raise ValueError(f"params hold {total} numbers, input_dim is "
                             f"{input_dim}.")
        perm = _torch_to_jax_permutation(params, _param_names(module, names))
        idx, sgn = idx[perm], sgn[perm]
    elif module is not None or names is not None:
        raise TypeError("module= and names= need params= to reorder the tables.")
    return CountSketch.from_tables(idx.astype(np.int32), sgn.astype(np.int8),
                                   int(output_dim))

