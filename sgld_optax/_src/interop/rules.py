r"""Names and layouts: which PyTorch tensor becomes which Flax leaf, and how.

Without rules, the usual PyTorch to Flax conventions apply:

| PyTorch | Flax (linen) |
|---|---|
| `a.b.weight` (dotted name) | `{"a": {"b": {...}}}` (nested dicts) |
| `layers.0` (container index) | `layers_0` |
| `Linear.weight` `(out, in)` | `kernel` `(in, out)` (transposed) |
| `ConvNd.weight` `(O, I, *K)` | `kernel` `(*K, I, O)` (OIHW to HWIO) |
| transformers' `Conv1D.weight` `(in, out)` | `kernel` `(in, out)` (kept) |
| norm-layer `weight` | `scale` |
| `Embedding.weight` | `embedding` |
| `running_mean` / `running_var` | `batch_stats` `mean` / `var` |
| `num_batches_tracked` | dropped |

A weight that goes to a `kernel` is transposed (or not) according to the
type of the module holding it when the torch module itself is given, and
according to the `nn.Linear` / `nn.ConvNd` convention for a bare state dict;
never according to its shape. `Rule`s override all of this, tensor by tensor.

Nothing here imports torch at module level: the conversions work on NumPy
state dicts and Flax trees.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import numpy as np


class CheckpointMismatchError(ValueError):
    """A checkpoint and a template do not line up.

    Raised once, listing every problem, before anything is converted.

    Attributes:
      missing: names the template has and the source lacks, with shapes
        (and, for a rule whose target is absent, a note).
      unexpected: names the source has and the template lacks, with shapes
        (and, for a rule whose target is absent, a note).
      mismatched: `(source name, target name, source shape, converted
        shape, expected shape)` for each pair whose shapes disagree; the
        converted shape is a sentence when the layout itself cannot be
        applied (a split or reshape that does not divide).
      other: further problems, as sentences: tied tensors that differ, and
        weights whose layout neither a rule nor the module type decides.
    """

    def __init__(self, message: str, missing: Sequence = (),
                 unexpected: Sequence = (), mismatched: Sequence = (),
                 other: Sequence = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.other = list(other)


# ---------------------------------------------------------------------------
# Layouts and rules
# ---------------------------------------------------------------------------


class _LayoutError(ValueError):
    """A layout that cannot be applied to an array of this shape."""


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise _LayoutError(f"there is no axis {axis} in {ndim} dimensions")
    return axis % ndim


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _axis_and_sizes(value, what: str, sizes_required: bool):
    """``(axis, sizes)`` of a split or unflatten argument, validated."""
    if _is_int(value) and not sizes_required:
        return int(value), None
    if (isinstance(value, Sequence) and not isinstance(value, str)
            and len(value) == 2 and _is_int(value[0])
            and isinstance(value[1], Sequence)
            and all(_is_int(s) for s in value[1]) and len(value[1]) >= 1):
        sizes = tuple(int(s) for s in value[1])
        if any(s < 1 and s != -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"{what}: sizes must be positive, with at most "
                             f"one -1; got {sizes}.")
        return int(value[0]), sizes
    form = "(axis, sizes)" if sizes_required else "an axis or (axis, sizes)"
    raise TypeError(f"{what} must be {form}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Layout:
    r"""How one PyTorch tensor is laid out as one or more Flax leaves.

    From PyTorch to Flax, up to three steps run in this order:

    1. `split`: a fused tensor is cut along one of its axes into as many
       parts as the rule has targets (GPT-2's `c_attn` holds query, key and
       value side by side);
    2. `transpose`: the axes of each part are permuted;
    3. `unflatten`: one axis of each part becomes several, as
       `torch.Tensor.unflatten` does (the $h \cdot d$ output features of a
       projection become the `(heads, head_dim)` axes of a multi-head
       `DenseGeneral` kernel).

    From Flax to PyTorch the inverse steps run in the reverse order, so a
    round trip is exact. A shape that does not divide is reported as a
    shape mismatch.

    The names `"keep"`, `"transpose"` and `"conv"` stand for `Layout()`,
    `Layout(transpose=True)` and `Layout(transpose="conv")` wherever a
    layout is expected.

    Attributes:
      transpose: `False` (keep the axes), `True` (reverse them: a 2-D
        `nn.Linear` weight `(out, in)` becomes a Dense kernel `(in, out)`),
        `"conv"` (`(O, I, *K)` to `(*K, I, O)`, a convolution weight), or a
        permutation of the axes, as for `numpy.transpose`.
      split: `None`; an axis of the PyTorch tensor to cut into equal parts,
        one per target of the rule; or `(axis, sizes)` for parts of given
        sizes (a fused query-key-value projection with fewer key-value
        heads).
      unflatten: `None`, or `(axis, sizes)`: the axis `axis` of each part
        (counted after the transpose) becomes axes of sizes `sizes`, one of
        which may be `-1`.

    Examples:
      >>> import numpy as np
      >>> from sgld_optax import torch_interop
      >>> w = np.arange(24, dtype=np.float32).reshape(2, 12)  # (in, 3 * out)
      >>> rule = torch_interop.Rule(
      ...     r"c_attn\.weight", ["q/kernel", "k/kernel", "v/kernel"],
      ...     torch_interop.Layout(split=1, unflatten=(1, (2, -1))))
      >>> params = torch_interop.params_from_torch({"c_attn.weight": w},
      ...                                          rules=[rule])
      >>> k = params["k"]["kernel"]
      >>> k.shape, bool((k == w[:, 4:8].reshape(2, 2, 2)).all())
      ((2, 2, 2), True)
    """

    transpose: Union[bool, str, tuple] = False
    split: Union[None, int, tuple] = None
    unflatten: Optional[tuple] = None

    def __post_init__(self):
        t = self.transpose
        if isinstance(t, (bool, np.bool_)):
            object.__setattr__(self, "transpose", bool(t))
        elif isinstance(t, str):
            if t != "conv":
                raise ValueError(f"transpose must be True, False, 'conv' or a "
                                 f"permutation, got {t!r}.")
        elif (isinstance(t, Sequence) and all(_is_int(a) for a in t)
              and sorted(int(a) for a in t) == list(range(len(t)))):
            object.__setattr__(self, "transpose", tuple(int(a) for a in t))
        else:
            raise ValueError(f"transpose must be True, False, 'conv' or a "
                             f"permutation of the axes, got {t!r}.")
        if self.split is not None:
            axis, sizes = _axis_and_sizes(self.split, "split", False)
            if sizes is not None and -1 in sizes:
                raise ValueError("split: sizes must all be given (no -1).")
            object.__setattr__(self, "split",
                               axis if sizes is None else (axis, sizes))
        if self.unflatten is not None:
            object.__setattr__(self, "unflatten", _axis_and_sizes(
                self.unflatten, "unflatten", True))

    @property
    def _parts(self) -> Optional[int]:
        """The number of parts a split with sizes makes, else None."""
        return len(self.split[1]) if isinstance(self.split, tuple) else None

    def _perm(self, ndim: int) -> Optional[tuple]:
        t = self.transpose
        if t is False or ndim < 2:
            return None
        if t is True:
            return tuple(range(ndim))[::-1]
        if t == "conv":
            return (*range(2, ndim), 1, 0)
        if len(t) != ndim:
            raise _LayoutError(f"the permutation {t} is for {len(t)} "
                               f"dimensions, the tensor has {ndim}")
        return t

    def _split_sizes(self, dim: int, n: int):
        if isinstance(self.split, tuple):
            sizes = self.split[1]
            if len(sizes) != n or sum(sizes) != dim:
                raise _LayoutError(f"an axis of size {dim} does not split "
                                   f"into parts of sizes {sizes}")
            return sizes
        if dim % n:
            raise _LayoutError(f"an axis of size {dim} does not split into "
                               f"{n} equal parts")
        return (dim // n,) * n

    def _unflat_shape(self, shape: tuple) -> tuple:
        axis, sizes = self.unflatten
        ax = _axis(axis, len(shape))
        dim = shape[ax]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if dim % known:
                raise _LayoutError(f"an axis of size {dim} does not unflatten "
                                   f"into {sizes}")
            sizes = tuple(dim // known if s == -1 else s for s in sizes)
        elif known != dim:
            raise _LayoutError(f"an axis of size {dim} does not unflatten into "
                               f"{sizes}")
        return shape[:ax] + sizes + shape[ax + 1:]

    def _to_flax(self, arr: np.ndarray, n: int = 1) -> list:
        """PyTorch layout -> ``n`` arrays in Flax layout."""
        if self.split is None:
            if n != 1:
                raise _LayoutError(f"one tensor cannot fill {n} leaves "
                                   "without a split")
            parts = [arr]
        else:
            axis = self.split if _is_int(self.split) else self.split[0]
            ax = _axis(axis, arr.ndim)
            sizes = self._split_sizes(arr.shape[ax], n)
            parts = np.split(arr, np.cumsum(sizes)[:-1], axis=ax)
        out = []
        for part in parts:
            perm = self._perm(part.ndim)
            if perm is not None:
                part = np.transpose(part, perm)
            if self.unflatten is not None:
                part = part.reshape(self._unflat_shape(part.shape))
            out.append(np.asarray(part, order="C"))
        return out

    def _to_torch(self, arrs: Sequence) -> np.ndarray:
        """Arrays in Flax layout -> one array in PyTorch layout."""
        if self.split is None and len(arrs) != 1:
            raise _LayoutError(f"{len(arrs)} leaves cannot fill one tensor "
                               "without a split")
        parts = []
        for part in arrs:
            part = np.asarray(part)
            if self.unflatten is not None:
                axis, sizes = self.unflatten
                k = len(sizes)
                pre = part.ndim - k + 1
                if pre < 1:
                    raise _LayoutError(f"a {part.ndim}-D leaf has no {k} axes "
                                       "to flatten")
                ax = _axis(axis, pre)
                got = part.shape[ax:ax + k]
                if any(s not in (-1, g) for s, g in zip(sizes, got)):
                    raise _LayoutError(f"the axes {ax} to {ax + k - 1} of a leaf "
                                       f"of shape {part.shape} are not {sizes}")
                part = part.reshape(part.shape[:ax] + (math.prod(got),)
                                    + part.shape[ax + k:])
            perm = self._perm(part.ndim)
            if perm is not None:
                part = np.transpose(part, np.argsort(perm))
            parts.append(part)
        if self.split is None:
            return np.asarray(parts[0], order="C")
        axis = self.split if _is_int(self.split) else self.split[0]
        if len({p.ndim for p in parts}) != 1:
            raise _LayoutError("the leaves of a split tensor differ in rank")
        ax = _axis(axis, parts[0].ndim)
        sizes = tuple(p.shape[ax] for p in parts)
        if isinstance(self.split, tuple):
            if sizes != self.split[1]:
                raise _LayoutError(f"the parts have sizes {sizes} along axis "
                                   f"{axis}, the split {self.split[1]}")
        elif len(set(sizes)) != 1:
            raise _LayoutError(f"the parts of an equal split have sizes {sizes}")
        try:
            return np.asarray(np.concatenate(parts, axis=ax), order="C")
        except ValueError as err:
            raise _LayoutError(f"the parts do not join along axis {axis}: "
                               f"{err}") from err


_KEEP = Layout()
_TRANSPOSE = Layout(transpose=True)
_CONV = Layout(transpose="conv")
_NAMED_LAYOUTS = {"keep": _KEEP, "transpose": _TRANSPOSE, "conv": _CONV}


def _as_layout(layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str) and layout in _NAMED_LAYOUTS:
        return _NAMED_LAYOUTS[layout]
    raise ValueError(f"layout must be a Layout or one of "
                     f"{sorted(_NAMED_LAYOUTS)}, got {layout!r}.")


@dataclasses.dataclass(frozen=True)
class Rule:
    r"""Where a PyTorch tensor goes in the Flax tree, and in which layout.

    A rule applies to every tensor whose name matches `pattern` in full
    (`re.fullmatch`). Its `target` is a Flax path with `/` between keys, in
    which `\1`, `\g<name>` and the like are replaced by the pattern's
    groups (`re.Match.expand`); empty keys are dropped, so an optional
    prefix group that did not match leaves no trace. The target is resolved
    against the template `like` as names without rules are: literally
    first, then ignoring `_N` vs `/N/` spellings of indices.

    Rules are tried in order and the first that matches wins, so rules put
    in front of a ready set (`[Rule(...), *gpt2_rules()]`) override it.
    Tensors no rule matches follow the default conventions.

    - Several targets: the tensor is split (the layout must say along which
      axis) and each part goes to one target.
    - The same target for several tensors: the tensors are tied (GPT-2's
      `lm_head.weight` is `transformer.wte.weight`). Reading, they must be
      bitwise equal after their layouts; writing, each gets the leaf.
    - `target=None`: the tensor is dropped (a buffer such as a causal mask,
      or a tied copy the Flax model does not keep). Writing, it is copied
      from the template `like`.

    Attributes:
      pattern: a regular expression for the full PyTorch name.
      target: a Flax path, a sequence of paths (a split), or `None`.
      layout: a `Layout`, or `"keep"`, `"transpose"` or `"conv"`.

    Examples:
      >>> import numpy as np
      >>> from sgld_optax import torch_interop
      >>> sd = {"h.0.attn.c_attn.weight": np.ones((4, 12), np.float32)}
      >>> rule = torch_interop.Rule(
      ...     r"h\.(\d+)\.attn\.c_attn\.weight",
      ...     [r"h_\1/attn/query/kernel", r"h_\1/attn/key/kernel",
      ...      r"h_\1/attn/value/kernel"],
      ...     torch_interop.Layout(split=1))
      >>> params = torch_interop.params_from_torch(sd, rules=[rule])
      >>> params["h_0"]["attn"]["key"]["kernel"].shape
      (4, 4)
    """

    pattern: str
    target: Union[str, Sequence[str], None]
    layout: Union[str, Layout] = "keep"

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"pattern must be a str, got {self.pattern!r}.")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"pattern {self.pattern!r}: {err}") from err
        target = self.target
        if isinstance(target, str):
            target = (target,)
        elif target is not None:
            if (not isinstance(target, Sequence)
                    or not all(isinstance(t, str) for t in target)
                    or not target):
                raise TypeError("target must be a path, a sequence of paths "
                                f"or None, got {self.target!r}.")
            target = tuple(target)
        object.__setattr__(self, "target", target)
        layout = _as_layout(self.layout)
        object.__setattr__(self, "layout", layout)
        if target is None:
            if layout != _KEEP:
                raise ValueError("A dropped tensor (target None) has no layout.")
            return
        if len(target) > 1 and layout.split is None:
            raise ValueError(f"{len(target)} targets need a layout that splits "
                             "the tensor (Layout(split=axis)).")
        if len(target) == 1 and layout.split is not None:
            raise ValueError("A split layout needs one target per part.")
        if layout._parts is not None and layout._parts != len(target):
            raise ValueError(f"The split makes {layout._parts} parts for "
                             f"{len(target)} targets.")

    def _paths(self, match) -> Optional[tuple]:
        if self.target is None:
            return None
        return tuple(tuple(tok for tok in match.expand(t).split("/") if tok)
                     for t in self.target)


def _as_rules(rules) -> tuple:
    if rules is None:
        return ()
    if isinstance(rules, Rule):
        return (rules,)
    rules = tuple(rules)
    bad = [r for r in rules if not isinstance(r, Rule)]
    if bad:
        raise TypeError(f"rules must be Rule objects, got {bad[0]!r}.")
    return rules


def _apply_rules(rules, name):
    """``(rule, paths)`` of the first rule matching ``name``, else None."""
    for rule in rules:
        m = re.fullmatch(rule.pattern, name)
        if m is not None:
            return rule, rule._paths(m)
    return None


# ---------------------------------------------------------------------------
# Module types
# ---------------------------------------------------------------------------


def _module_kind(module) -> str:
    """What a module's ``weight`` is: "linear", "conv", "conv1d" (transformers'
    ``Conv1D``, stored ``(in, out)``), "embedding", or the type's name."""
    import torch  # pylint: disable=import-outside-toplevel  (a module exists)
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.modules.conv._ConvNd):  # pylint: disable=protected-access
        return "conv" if not module.transposed else _type_name(module)
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return "embedding"
    if any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
           for c in type(module).__mro__):
        return "conv1d"
    return _type_name(module)


def _type_name(x) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _module_kinds(module, names=None) -> dict:
    """For each state-dict (or given) name, the kind of the module holding it."""
    if names is None:
        names = list(module.state_dict().keys())
    out = {}
    for name in names:
        owner = name.rpartition(".")[0]
        try:
            sub = module.get_submodule(owner) if owner else module
        except AttributeError:
            continue
        out[name] = _module_kind(sub)
    return out


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

_DIGITS = re.compile(r"^\d+$")
_TRAILING_INDEX = re.compile(r"^(.+)_(\d+)$")
_EMBEDDING_HINT = re.compile(r"(emb|^wte$|^wpe$)", re.IGNORECASE)
_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight", "gamma")


class _Entry(NamedTuple):
    coll: str           # "params", "batch_stats" or another collection
    mods: tuple         # module path tokens
    leaf: str           # canonical leaf name


def _torch_entry(name: str) -> Optional[_Entry]:
    parts = name.split(".")
    leaf, mods = parts[-1], tuple(parts[:-1])
    if leaf == "num_batches_tracked":
        return None
    if leaf in ("running_mean", "running_var"):
        return _Entry("batch_stats", mods, leaf)
    return _Entry("params", mods, {"gamma": "weight", "beta": "bias"}.get(leaf, leaf))


def _flax_entry(tokens: tuple, variables: bool) -> _Entry:
    if variables:
        coll, rest = tokens[0], tokens[1:]
    else:
        coll, rest = "params", tokens
    if not rest:
        return _Entry(coll, (), "")
    mods, leaf = tuple(rest[:-1]), rest[-1]
    if coll == "batch_stats" and leaf in ("mean", "var"):
        leaf = "running_" + leaf
    elif leaf in _WEIGHT_LEAVES:
        leaf = "weight"
    elif leaf == "beta":
        leaf = "bias"
    return _Entry(coll, mods, leaf)


def _merge_indices(mods) -> tuple:
    """``("layers", "0")`` -> ``("layers_0",)``; a leading index -> ``layers_N``."""
    out = []
    for tok in mods:
        if _DIGITS.match(tok):
            out.append(f"{out.pop()}_{tok}" if out else f"layers_{tok}")
        else:
            out.append(tok)
    return tuple(out)


def _split_indices(mods) -> tuple:
    """``("net_0_1",)`` -> ``("net", "0", "1")``."""
    out = []
    for tok in mods:
        tail = []
        while (m := _TRAILING_INDEX.match(tok)) is not None:
            tok = m.group(1)
            tail.append(m.group(2))
        out.append(tok)
        out.extend(reversed(tail))
    return tuple(out)


def _drop_sequential(mods) -> tuple:
    """Drops ``layers`` tokens that stand before an index (``nn.Sequential``)."""
    return tuple(t for i, t in enumerate(mods)
                 if not (t == "layers" and i + 1 < len(mods)
                         and _DIGITS.match(mods[i + 1])))


def _canonical(entry: _Entry, level: int, side: str) -> tuple:
    mods = entry.mods
    if level == 0:
        mods = _merge_indices(mods) if side == "torch" else mods
    else:
        mods = _split_indices(mods)
        if level == 2:
            mods = _drop_sequential(mods)
    return (entry.coll, mods, entry.leaf)


def _match(torch_names, flax_entries):
    """Pairs torch names with flax leaves; returns (pairs, torch left, flax left).

    ``flax_entries`` maps a flax key to its `_Entry`. Names are paired
    when their canonical forms agree and are unique on both sides, first
    exactly, then ignoring ``_N`` vs ``.N`` spelling, then also ignoring the
    ``layers`` level of ``nn.Sequential``.
    """
    t_left = {n: e for n in torch_names if (e := _torch_entry(n)) is not None}
    f_left = dict(flax_entries)
    pairs = {}
    for level in (0, 1, 2):
        t_groups = collections.defaultdict(list)
        f_groups = collections.defaultdict(list)
        for n, e in t_left.items():
            t_groups[_canonical(e, level, "torch")].append(n)
        for k, e in f_left.items():
            f_groups[_canonical(e, level, "flax")].append(k)
        for canon, names in t_groups.items():
            keys = f_groups.get(canon, [])
            if len(names) == 1 and len(keys) == 1:
                pairs[names[0]] = keys[0]
                del t_left[names[0]]
                del f_left[keys[0]]
    return pairs, list(t_left), list(f_left)



def _key_token(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_tokens(path) -> tuple:
    return tuple(_key_token(k) for k in path)


def _is_variables(tree) -> bool:
    return (isinstance(tree, Mapping) and "params" in tree
            and isinstance(tree["params"], Mapping)
            and all(isinstance(v, Mapping) for v in tree.values()))


def _ordered_leaves(tree, prefix=()):
    """(tokens, leaf) pairs in insertion order (jax.tree_util sorts dict keys)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _ordered_leaves(v, prefix + (str(k),))
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        for i, v in enumerate(tree):
            yield from _ordered_leaves(v, prefix + (str(i),))
    elif tree is not None:
        yield prefix, tree


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", np.shape(x)))


def _fmt_path(tokens) -> str:
    return "/".join(tokens)



def _nest(items):
    """Nested dicts from (tokens, value) pairs, keeping their order."""
    root = {}
    for tokens, value in items:
        node = root
        for tok in tokens[:-1]:
            node = node.setdefault(tok, {})
            if not isinstance(node, dict):
                raise ValueError(f"{_fmt_path(tokens)} clashes with a leaf of "
                                 "the same name.")
        if tokens[-1] in node:
            raise ValueError(f"Two checkpoint entries map to {_fmt_path(tokens)}.")
        node[tokens[-1]] = value
    return root


def _default_flax_name(name: str, arr: np.ndarray, kind: Optional[str] = None):
    """Flax (collection, path) for a torch name when there is no template."""
    entry = _torch_entry(name)
    if entry is None:
        return None
    mods = _merge_indices(entry.mods)
    raw_leaf = name.split(".")[-1]
    if entry.coll == "batch_stats":
        return "batch_stats", mods + (raw_leaf[len("running_"):],)
    if entry.leaf == "weight":
        if arr.ndim == 1:
            leaf = "scale"
        elif kind == "embedding":
            leaf = "embedding"
        elif kind in ("linear", "conv", "conv1d"):
            leaf = "kernel"
        elif arr.ndim == 2 and mods and _EMBEDDING_HINT.search(mods[-1]):
            leaf = "embedding"
        elif arr.ndim >= 2:
            leaf = "kernel"
        else:
            leaf = raw_leaf
    else:
        leaf = entry.leaf
    return "params", mods + (leaf,)


def _default_layout(flax_leaf: str, ndim: int, kind: Optional[str]):
    """The layout of a tensor no rule covers.

    Only weights going to a ``kernel`` are permuted. With the module's kind
    known, it decides; for a bare state dict (``kind`` None) the
    ``nn.Linear`` / ``nn.ConvNd`` convention applies. Returns a sentence
    instead of a `Layout` when nothing decides.
    """
    if flax_leaf != "kernel" or ndim < 2:
        return _KEEP
    if kind is None:
        return _TRANSPOSE if ndim == 2 else _CONV
    if kind == "linear":
        return _TRANSPOSE
    if kind == "conv":
        return _CONV
    if kind == "conv1d":
        return _KEEP
    return f"its module is a {kind}, whose layout is not known"


def _path_form(tokens: tuple, level: int) -> tuple:
    mods = _split_indices(tokens[:-1])
    if level == 2:
        mods = _drop_sequential(mods)
    return mods + tokens[-1:]


class _FlaxIndex:
    """Finds the leaf a rule's target path names."""

    def __init__(self, tokens: list, variables: bool):
        self.variables = variables
        self.colls = {t[0] for t in tokens if t} if variables else set()
        self.exact = {t: i for i, t in enumerate(tokens)}
        self.forms = {1: collections.defaultdict(list),
                      2: collections.defaultdict(list)}
        for i, t in enumerate(tokens):
            for level, form in self.forms.items():
                form[_path_form(t, level)].append(i)

    def resolve(self, path: tuple) -> Optional[int]:
        if self.variables and (not path or path[0] not in self.colls):
            path = ("params",) + path
        if path in self.exact:
            return self.exact[path]
        for level in (1, 2):
            hits = self.forms[level].get(_path_form(path, level), [])
            if len(hits) == 1:
                return hits[0]
        return None


class _Source(NamedTuple):
    leaves: tuple       # Flax leaf indices; () when the tensor is dropped
    layout: Any         # a Layout, or a sentence when none is decided
    convention: bool    # the layout is the state-dict convention's


class _Plan(NamedTuple):
    sources: dict       # torch name -> _Source
    unused: list        # torch names that go nowhere
    unfilled: list      # Flax leaf indices nothing goes to
    unresolved: list    # (torch name, path) of rule targets not found


def _plan(torch_names, ndims: Mapping, tokens: list, variables: bool,
          rules: tuple, kinds: Optional[Mapping]) -> _Plan:
    """Pairs torch names with Flax leaves: rules first, then the defaults."""
    kinds = kinds or {}
    index = _FlaxIndex(tokens, variables)
    sources, unresolved, taken, free = {}, [], set(), []
    for name in torch_names:
        hit = _apply_rules(rules, name)
        if hit is None:
            free.append(name)
            continue
        rule, paths = hit
        if paths is None:
            sources[name] = _Source((), _KEEP, False)
            continue
        found = []
        for path in paths:
            i = index.resolve(path)
            if i is None:
                unresolved.append((name, path))
            else:
                found.append(i)
        taken.update(found)
        if len(found) == len(paths):
            sources[name] = _Source(tuple(found), rule.layout, False)
    # Leaves that rules fill stay matchable by name: a tensor matched to one
    # is tied to the rule's (`lm_head.weight` -> `wte` next to `wte.weight`).
    entries = {i: _flax_entry(t, variables) for i, t in enumerate(tokens)}
    pairs, unused, unfilled = _match(free, entries)
    for name, i in pairs.items():
        kind = kinds.get(name)
        layout = _default_layout(tokens[i][-1], ndims[name], kind)
        sources[name] = _Source((i,), layout, kind is None)
    unfilled = sorted(i for i in unfilled if i not in taken)
    return _Plan(sources, unused, unfilled, unresolved)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8):
        view = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(np.asarray(a, order="C").view(view),
                                   np.asarray(b, order="C").view(view)))
    return a.tobytes() == b.tobytes()


def _fmt_shapes(shapes) -> str:
    shapes = list(shapes)
    return str(shapes[0]) if len(shapes) == 1 else ", ".join(map(str, shapes))


def _mismatch_error(header, missing=(), unexpected=(), mismatched=(), other=(),
                    hints=()):
    lines = []
    for item in missing:
        note = f": {item[2]}" if len(item) > 2 else ""
        lines.append(f"missing: {item[0]} (shape {item[1]}){note}")
    for item in unexpected:
        note = f": {item[2]}" if len(item) > 2 else ""
        lines.append(f"unexpected: {item[0]} (shape {item[1]}){note}")
    for src, dst, src_shape, conv_shape, want in mismatched:
        if isinstance(conv_shape, str):
            conv = f" ({conv_shape})"
        else:
            conv = f" -> {conv_shape}" if conv_shape != src_shape else ""
        lines.append(f"shape mismatch: {src} {src_shape}{conv} vs {dst} "
                     f"expected {want}")
    lines.extend(other)
    n = len(lines)
    message = (f"{header} ({n} problem{'s' if n != 1 else ''}):\n  "
               + "\n  ".join(lines))
    if hints:
        message += "\n" + "\n".join(hints)
    return CheckpointMismatchError(message, missing, unexpected, mismatched,
                                   other)


def _storage_hint(untransposed, square) -> list:
    """Explains 2-D weights stored (in, out), read with the nn.Linear convention."""
    if not untransposed:
        return []
    hint = (f"hint: {', '.join(untransposed)} fit only untransposed, as "
            "weights stored (in, out) like those of transformers' Conv1D; the "
            "2-D weights of a bare state dict that go to a kernel are read as "
            "nn.Linear weights (out, in) and transposed. Pass the torch "
            "module itself (its module types decide) or rules= (for GPT-2, "
            "torch_interop.gpt2_rules()).")
    if square:
        hint += (f" The square weights {', '.join(square)} were transposed "
                 "the same way, which their shapes cannot reveal.")
    return [hint]


def _undecided(name, shape, path, reason) -> str:
    return (f"layout undecided: {name} {shape} -> {path}: {reason}; give it a "
            "Rule with layout 'transpose' or 'keep'")


def _state_dict_to_flax(sd: Mapping, like=None, rules=(),
                        kinds: Optional[Mapping] = None):
    """NumPy state dict -> nested NumPy tree (Flax names and layouts).

    ``kinds`` maps torch names to the kind of the module holding them, when
    the module is known.
    """
    rules = _as_rules(rules)
    if like is None:
        return _state_dict_to_flax_free(sd, rules, kinds or {})
    variables = _is_variables(like)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    tokens = [_path_tokens(p) for p, _ in flat]
    want = [_shape(x) for _, x in flat]
    plan = _plan(list(sd), {n: a.ndim for n, a in sd.items()}, tokens,
                 variables, rules, kinds)
    leaves, origin = [None] * len(flat), [None] * len(flat)
    mismatched, other, untransposed, square = [], [], [], []
    for name, src in plan.sources.items():
        arr = sd[name]
        if not src.leaves:
            continue
        dst = ", ".join(_fmt_path(tokens[i]) for i in src.leaves)
        if isinstance(src.layout, str):
            other.append(_undecided(name, arr.shape, dst, src.layout))
            continue
        try:
            parts = src.layout._to_flax(arr, len(src.leaves))  # pylint: disable=protected-access
        except _LayoutError as err:
            mismatched.append((name, dst, arr.shape, str(err),
                               _fmt_shapes(want[i] for i in src.leaves)))
            continue
        transposed_2d = (src.convention and arr.ndim == 2
                         and src.layout.transpose is True)
        for i, part in zip(src.leaves, parts):
            if part.shape != want[i]:
                mismatched.append((name, _fmt_path(tokens[i]), arr.shape,
                                   part.shape, want[i]))
                if transposed_2d and arr.shape == want[i]:
                    untransposed.append(name)
                continue
            if transposed_2d and arr.shape[0] == arr.shape[1]:
                square.append(name)
            if leaves[i] is None:
                leaves[i], origin[i] = part, name
            elif not _same_bits(leaves[i], part):
                other.append(f"tied tensors differ: {origin[i]} and {name} "
                             f"both go to {_fmt_path(tokens[i])}")
    missing = [(_fmt_path(tokens[i]), want[i]) for i in plan.unfilled]
    unexpected = [(n, sd[n].shape) for n in plan.unused]
    unexpected += [(n, sd[n].shape, f"its rule's target {_fmt_path(p)} is not "
                    "in like") for n, p in plan.unresolved]
    if missing or unexpected or mismatched or other:
        header = "The checkpoint does not match `like`"
        if not variables and any(
                _torch_entry(n) and _torch_entry(n).coll == "batch_stats"
                for n in plan.unused):
            header += (" (it has BatchNorm running statistics: pass the full "
                       "variables {'params': ..., 'batch_stats': ...} as like)")
        raise _mismatch_error(header, missing, unexpected, mismatched, other,
                              _storage_hint(untransposed, square))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _state_dict_to_flax_free(sd: Mapping, rules: tuple, kinds: Mapping):
    """`_state_dict_to_flax` without a template: the names decide."""
    items = {}   # (collection, path) -> (value, torch name, by a rule)
    mismatched, other = [], []

    def put(coll, path, value, name, by_rule):
        key = (coll, path)
        if key not in items:
            items[key] = (value, name, by_rule)
        elif not (by_rule or items[key][2]):  # only rules tie tensors
            raise ValueError(f"Two checkpoint entries map to {_fmt_path(path)}.")
        elif not _same_bits(items[key][0], value):
            other.append(f"tied tensors differ: {items[key][1]} and {name} "
                         f"both go to {_fmt_path(path)}")

    for name, arr in sd.items():
        hit = _apply_rules(rules, name)
        if hit is not None:
            rule, paths = hit
            if paths is None:
                continue
            try:
                parts = rule.layout._to_flax(arr, len(paths))  # pylint: disable=protected-access
            except _LayoutError as err:
                mismatched.append((name, ", ".join(map(_fmt_path, paths)),
                                   arr.shape, str(err), "a layout that fits"))
                continue
            for path, part in zip(paths, parts):
                if path[:1] in (("params",), ("batch_stats",)) and len(path) > 1:
                    put(path[0], path[1:], part, name, True)
                else:
                    put("params", path, part, name, True)
            continue
        kind = kinds.get(name)
        target = _default_flax_name(name, arr, kind)
        if target is None:
            continue
        coll, path = target
        layout = _default_layout(path[-1], arr.ndim, kind)
        if isinstance(layout, str):
            other.append(_undecided(name, arr.shape, _fmt_path(path), layout))
            continue
        put(coll, path, layout._to_flax(arr)[0], name, False)  # pylint: disable=protected-access
    if mismatched or other:
        raise _mismatch_error("The checkpoint cannot be converted",
                              mismatched=mismatched, other=other)
    params = _nest((p, v) for (c, p), (v, *_) in items.items() if c == "params")
    stats = [(p, v) for (c, p), (v, *_) in items.items() if c == "batch_stats"]
    if stats:
        return {"params": params, "batch_stats": _nest(stats)}
    return params


def _leaf_to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _flax_to_state_dict(params, spec=None, rules=(),
                        kinds: Optional[Mapping] = None):
    """Nested Flax tree -> ordered dict of NumPy arrays in torch layout.

    ``spec`` maps each torch name of the template to an object with
    ``shape`` and ``dtype``. Entries the Flax side does not keep are
    ``None``: the caller copies them from the template.
    """
    rules = _as_rules(rules)
    variables = _is_variables(params)
    items = list(_ordered_leaves(params))
    if not items:
        raise ValueError("params has no leaves.")
    if spec is None:
        if rules:
            raise TypeError("rules= needs like= (the torch module, its state "
                            "dict or a checkpoint), whose names the rules map.")
        return _flax_to_state_dict_free(items, variables)
    tokens = [t for t, _ in items]
    values = [v for _, v in items]
    plan = _plan(list(spec), {n: len(s.shape) for n, s in spec.items()},
                 tokens, variables, rules, kinds)
    out = collections.OrderedDict()
    mismatched, other, untransposed, square = [], [], [], []
    for name, s in spec.items():
        src = plan.sources.get(name)
        if src is None or not src.leaves:
            out[name] = None  # from the template (or reported missing)
            continue
        paths = ", ".join(_fmt_path(tokens[i]) for i in src.leaves)
        if isinstance(src.layout, str):
            other.append(_undecided(name, tuple(s.shape), paths, src.layout))
            continue
        arrs = [_leaf_to_numpy(values[i]) for i in src.leaves]
        shapes = _fmt_shapes(a.shape for a in arrs)
        try:
            arr = src.layout._to_torch(arrs)  # pylint: disable=protected-access
        except _LayoutError as err:
            mismatched.append((paths, name, shapes, str(err), tuple(s.shape)))
            continue
        transposed_2d = (src.convention and arr.ndim == 2
                         and src.layout.transpose is True)
        if arr.shape != tuple(s.shape):
            mismatched.append((paths, name, shapes, arr.shape, tuple(s.shape)))
            if transposed_2d and arrs[0].shape == tuple(s.shape):
                untransposed.append(name)
            continue
        if transposed_2d and arr.shape[0] == arr.shape[1]:
            square.append(name)
        if arr.dtype != s.dtype:
            arr = arr.astype(s.dtype)
        out[name] = np.asarray(arr, order="C")
    missing = [(n, tuple(spec[n].shape)) for n in plan.unused]
    missing += [(n, tuple(spec[n].shape), f"its rule's target {_fmt_path(p)} "
                 "is not in params") for n, p in plan.unresolved]
    unexpected = [(_fmt_path(tokens[i]), _shape(values[i]))
                  for i in plan.unfilled]
    if missing or unexpected or mismatched or other:
        raise _mismatch_error("params do not match the torch state dict `like`",
                              missing, unexpected, mismatched, other,
                              _storage_hint(untransposed, square))
    return out


def _flax_to_state_dict_free(items, variables):
    """`_flax_to_state_dict` without a template: the names decide."""
    out, seen_mods = collections.OrderedDict(), []
    bn_mods = []
    for tokens, leaf in items:
        e = _flax_entry(tokens, variables)
        if e.coll not in ("params", "batch_stats") or not e.leaf:
            raise ValueError(
                f"Cannot name {_fmt_path(tokens)} in torch without a "
                "template; pass like=.")
        arr = _leaf_to_numpy(leaf)
        name = ".".join(_split_indices(e.mods) + (e.leaf,))
        if e.coll == "batch_stats" and e.mods not in bn_mods:
            bn_mods.append(e.mods)
        if name in out:
            raise ValueError(f"Two leaves map to the torch name {name!r}.")
        layout = _default_layout(tokens[-1], arr.ndim, None)
        out[name] = layout._to_torch([arr])  # pylint: disable=protected-access
        if e.mods not in seen_mods:
            seen_mods.append(e.mods)
    for mods in bn_mods:
        name = ".".join(_split_indices(mods) + ("num_batches_tracked",))
        out[name] = np.array(0, np.int64)
    # Keep each module's entries together, modules in first-seen order.
    order = {_split_indices(m): i for i, m in enumerate(seen_mods)}
    rank = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3,
            "num_batches_tracked": 4}
    keys = sorted(out, key=lambda n: (
        order.get(tuple(n.split(".")[:-1]), len(order)),
        rank.get(n.split(".")[-1], 5)))
    return collections.OrderedDict((k, out[k]) for k in keys)


# ---------------------------------------------------------------------------
# Ready rule sets
# ---------------------------------------------------------------------------


def _dense(torch_mod: str, flax_mod: str, weight="transpose", bias="keep"):
    """Rules for the weight and bias of one projection."""
    return [Rule(torch_mod + r"\.weight", flax_mod + "/kernel", weight),
            Rule(torch_mod + r"\.bias", flax_mod + "/bias", bias)]


def _norm(torch_mod: str, flax_mod: str, bias: bool = True):
    rules = [Rule(torch_mod + r"\.weight", flax_mod + "/scale")]
    if bias:
        rules.append(Rule(torch_mod + r"\.bias", flax_mod + "/bias"))
    return rules


def _heads(value, what: str) -> Optional[int]:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")
    return int(value)


def gpt2_rules(*, num_heads: Optional[int] = None) -> list:
    r"""Rules for Hugging Face GPT-2 (`GPT2LMHeadModel`, `GPT2Model`).

    The Flax tree mirrors the PyTorch names, with indices as `h_0`,
    `h_1`, ... (`h/0` works too) and the `transformer` level present or
    absent as in the checkpoint:

    | PyTorch | Flax | layout |
    |---|---|---|
    | `transformer.wte.weight`, `wpe.weight` | `transformer/wte/embedding`, `wpe/embedding` | kept |
    | `h.N.ln_1`, `h.N.ln_2`, `ln_f` (`weight`, `bias`) | `.../scale`, `.../bias` | kept |
    | `h.N.attn.c_attn.weight` `(d, 3d)` | `h_N/attn/c_attn/kernel` | kept |
    | `h.N.attn.c_proj.weight` `(d, d)` | `h_N/attn/c_proj/kernel` | kept |
    | `h.N.mlp.c_fc.weight`, `h.N.mlp.c_proj.weight` | `h_N/mlp/c_fc/kernel`, ... | kept |
    | `lm_head.weight` | tied to `transformer/wte/embedding` | kept |
    | `h.N.attn.bias`, `h.N.attn.masked_bias` (buffers) | dropped | |

    GPT-2's projections are transformers' `Conv1D` modules, whose weights are
    stored `(in, out)` like a Flax kernel: none is transposed. `lm_head` is
    tied to the token embedding, so the Flax model computes its logits with
    `wte.attend(x)`; for a separate head, put
    `Rule(r"lm_head\.weight", "lm_head/kernel", "transpose")` in front.

    With `num_heads`, the attention takes the parameter names and shapes of
    `flax.linen.MultiHeadDotProductAttention` and
    `flax.nnx.MultiHeadAttention` (`qkv_features` = $d$, `num_heads` = $h$,
    a head of size $d / h$): `c_attn` is split into
    `h_N/attn/query`, `key` and `value`, with kernels $(d, h, d/h)$ and
    biases $(h, d/h)$, and `c_proj` becomes `h_N/attn/out`, with a kernel
    $(h, d/h, d)$.

    Args:
      num_heads: the number of attention heads, for multi-head attention
        modules; `None` keeps `c_attn` fused and `c_proj` 2-D.

    Returns:
      A list of `Rule`s for `params_from_torch` and `params_to_torch`.

    Examples:
      >>> import numpy as np
      >>> from sgld_optax import torch_interop
      >>> sd = {"transformer.h.0.attn.c_attn.weight":
      ...       np.zeros((8, 24), np.float32)}
      >>> params = torch_interop.params_from_torch(
      ...     sd, rules=torch_interop.gpt2_rules(num_heads=2))
      >>> params["transformer"]["h_0"]["attn"]["query"]["kernel"].shape
      (8, 2, 4)
    """
    h = _heads(num_heads, "num_heads")
    p, tp = r"(?:(?P<p>transformer)\.)?", r"\g<p>/"
    blk, tblk = p + r"h\.(?P<i>\d+)\.", tp + r"h_\g<i>/"
    rules = [
        Rule(p + r"wte\.weight", tp + "wte/embedding"),
        Rule(p + r"wpe\.weight", tp + "wpe/embedding"),
        Rule(blk + r"attn\.(?:bias|masked_bias)", None),
        *_norm(blk + r"ln_1", tblk + "ln_1"),
        *_norm(blk + r"ln_2", tblk + "ln_2"),
    ]
    if h is None:
        rules += [*_dense(blk + r"attn\.c_attn", tblk + "attn/c_attn", "keep"),
                  *_dense(blk + r"attn\.c_proj", tblk + "attn/c_proj", "keep")]
    else:
        qkv = ("query", "key", "value")
        rules += [
            Rule(blk + r"attn\.c_attn\.weight",
                 [tblk + f"attn/{n}/kernel" for n in qkv],
                 Layout(split=1, unflatten=(1, (h, -1)))),
            Rule(blk + r"attn\.c_attn\.bias",
                 [tblk + f"attn/{n}/bias" for n in qkv],
                 Layout(split=0, unflatten=(0, (h, -1)))),
            *_dense(blk + r"attn\.c_proj", tblk + "attn/out",
                    Layout(unflatten=(0, (h, -1)))),
        ]
    rules += [
        *_dense(blk + r"mlp\.c_fc", tblk + "mlp/c_fc", "keep"),
        *_dense(blk + r"mlp\.c_proj", tblk + "mlp/c_proj", "keep"),
        *_norm(p + r"ln_f", tp + "ln_f"),
        Rule(r"lm_head\.weight", "transformer/wte/embedding"),
    ]
    return rules


def llama_rules(*, num_heads: Optional[int] = None,
                num_kv_heads: Optional[int] = None,
                tie_word_embeddings: bool = False) -> list:
    r"""Rules for Llama-style decoders (`LlamaForCausalLM`, `LlamaModel`).

    Decoders with separate query, key, value and output projections and
    RMSNorm, named as Hugging Face's Llama (Mistral, Qwen2 and others use
    the same names). The Flax tree mirrors the PyTorch names, with indices
    as `layers_0`, `layers_1`, ... and the `model` level present or absent
    as in the checkpoint:

    | PyTorch | Flax | layout |
    |---|---|---|
    | `model.embed_tokens.weight` | `model/embed_tokens/embedding` | kept |
    | `layers.N.self_attn.{q,k,v,o}_proj.weight` | `layers_N/self_attn/q_proj/kernel`, ... | transposed |
    | `layers.N.mlp.{gate,up,down}_proj.weight` | `layers_N/mlp/gate_proj/kernel`, ... | transposed |
    | `layers.N.input_layernorm.weight`, `post_attention_layernorm`, `norm` | `.../scale` | kept |
    | `lm_head.weight` | `lm_head/kernel` | transposed |
    | `rotary_emb.inv_freq` (a buffer) | dropped | |

    Biases, where a model has them (`attention_bias`, `mlp_bias`), go to
    `.../bias`.

    With `num_heads`, the attention projections are multi-head
    `DenseGeneral` kernels: `q_proj` $(d, h, d_h)$, `k_proj` and `v_proj`
    $(d, h_{kv}, d_h)$, `o_proj` $(h, d_h, d)$, and their biases
    $(h, d_h)$ and $(h_{kv}, d_h)$.

    Args:
      num_heads: the number of query heads $h$, for multi-head kernels;
        `None` keeps them 2-D.
      num_kv_heads: the number of key-value heads $h_{kv}$ (grouped-query
        attention); default `num_heads`.
      tie_word_embeddings: `lm_head.weight` is the token embedding (the
        model's `tie_word_embeddings`), so the Flax model computes its logits
        with `embed_tokens.attend(x)`.

    Returns:
      A list of `Rule`s for `params_from_torch` and `params_to_torch`.

    Examples:
      >>> import numpy as np
      >>> from sgld_optax import torch_interop
      >>> sd = {"model.layers.0.self_attn.k_proj.weight":
      ...       np.zeros((8, 32), np.float32)}   # (h_kv * d_h, d)
      >>> params = torch_interop.params_from_torch(
      ...     sd, rules=torch_interop.llama_rules(num_heads=4, num_kv_heads=2))
      >>> params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
      (32, 2, 4)
    """
    h = _heads(num_heads, "num_heads")
    kv = _heads(num_kv_heads, "num_kv_heads")
    if kv is not None and h is None:
        raise ValueError("num_kv_heads needs num_heads.")
    kv = h if kv is None else kv
    p, tp = r"(?:(?P<p>model)\.)?", r"\g<p>/"
    blk, tblk = p + r"layers\.(?P<i>\d+)\.", tp + r"layers_\g<i>/"
    rules = [
        Rule(p + r"embed_tokens\.weight", tp + "embed_tokens/embedding"),
        Rule(p + r"(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None),
    ]
    for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        weight = (_TRANSPOSE if h is None
                  else Layout(transpose=True, unflatten=(1, (heads, -1))))
        bias = _KEEP if h is None else Layout(unflatten=(0, (heads, -1)))
        rules += _dense(blk + rf"self_attn\.{name}", tblk + f"self_attn/{name}",
                        weight, bias)
    rules += _dense(blk + r"self_attn\.o_proj", tblk + "self_attn/o_proj",
                    _TRANSPOSE if h is None
                    else Layout(transpose=True, unflatten=(0, (h, -1))))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += _dense(blk + rf"mlp\.{name}", tblk + f"mlp/{name}")
    rules += [
        *_norm(blk + r"input_layernorm", tblk + "input_layernorm", bias=False),
        *_norm(blk + r"post_attention_layernorm",
               tblk + "post_attention_layernorm", bias=False),
        *_norm(p + r"norm", tp + "norm", bias=False),
        (Rule(r"lm_head\.weight", "model/embed_tokens/embedding")
         if tie_word_embeddings
         else Rule(r"lm_head\.weight", "lm_head/kernel", "transpose")),
    ]
    return rules


def bert_rules(*, num_heads: Optional[int] = None) -> list:
    r"""Rules for Hugging Face BERT (`BertModel`, and the `bert` of its heads).

    The Flax tree mirrors the PyTorch names, with indices as `layer_0`,
    `layer_1`, ... and the `bert` level present or absent as in the
    checkpoint:

    | PyTorch | Flax | layout |
    |---|---|---|
    | `embeddings.{word,position,token_type}_embeddings.weight` | `embeddings/word_embeddings/embedding`, ... | kept |
    | `embeddings.LayerNorm` (`weight`, `bias`) | `embeddings/LayerNorm/scale`, `bias` | kept |
    | `encoder.layer.N.attention.self.{query,key,value}.weight` | `encoder/layer_N/attention/self/query/kernel`, ... | transposed |
    | `encoder.layer.N.attention.output.dense.weight` | `.../attention/output/dense/kernel` | transposed |
    | `encoder.layer.N.intermediate.dense`, `output.dense` | `.../intermediate/dense/kernel`, ... | transposed |
    | `....LayerNorm` (`weight`, `bias`) | `.../LayerNorm/scale`, `bias` | kept |
    | `pooler.dense.weight` | `pooler/dense/kernel` | transposed |
    | `embeddings.position_ids`, `token_type_ids` (buffers) | dropped | |

    Heads on top of the encoder (`cls.predictions...`) follow the default
    conventions; add rules in front for their tied decoder.

    With `num_heads`, the attention projections are multi-head
    `DenseGeneral` kernels: `query`, `key`, `value` $(d, h, d/h)$ with
    biases $(h, d/h)$, and `attention/output/dense` $(h, d/h, d)$.

    Args:
      num_heads: the number of attention heads, for multi-head kernels;
        `None` keeps them 2-D.

    Returns:
      A list of `Rule`s for `params_from_torch` and `params_to_torch`.

    Examples:
      >>> import numpy as np
      >>> from sgld_optax import torch_interop
      >>> sd = {"encoder.layer.0.attention.self.query.weight":
      ...       np.zeros((8, 6), np.float32)}   # (out, in)
      >>> params = torch_interop.params_from_torch(
      ...     sd, rules=torch_interop.bert_rules())
      >>> params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape
      (6, 8)
    """
    h = _heads(num_heads, "num_heads")
    p, tp = r"(?:(?P<p>bert)\.)?", r"\g<p>/"
    blk, tblk = (p + r"encoder\.layer\.(?P<i>\d+)\.",
                 tp + r"encoder/layer_\g<i>/")
    rules = [
        Rule(p + r"embeddings\.(?P<e>word|position|token_type)_embeddings"
             r"\.weight", tp + r"embeddings/\g<e>_embeddings/embedding"),
        Rule(p + r"embeddings\.(?:position_ids|token_type_ids)", None),
        *_norm(p + r"embeddings\.LayerNorm", tp + "embeddings/LayerNorm"),
    ]
    for name in ("query", "key", "value"):
        rules += _dense(
            blk + rf"attention\.self\.{name}", tblk + f"attention/self/{name}",
            _TRANSPOSE if h is None
            else Layout(transpose=True, unflatten=(1, (h, -1))),
            _KEEP if h is None else Layout(unflatten=(0, (h, -1))))
    rules += [
        *_dense(blk + r"attention\.output\.dense",
                tblk + "attention/output/dense",
                _TRANSPOSE if h is None
                else Layout(transpose=True, unflatten=(0, (h, -1)))),
        *_norm(blk + r"attention\.output\.LayerNorm",
               tblk + "attention/output/LayerNorm"),
        *_dense(blk + r"intermediate\.dense", tblk + "intermediate/dense"),
        *_dense(blk + r"output\.dense", tblk + "output/dense"),
        *_norm(blk + r"output\.LayerNorm", tblk + "output/LayerNorm"),
        *_dense(p + r"pooler\.dense", tp + "pooler/dense"),
    ]
    return rules
