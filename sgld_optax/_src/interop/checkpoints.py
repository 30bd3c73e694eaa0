"""Checkpoint files and in-memory state dicts: reading, writing, converting.

PyTorch is optional. Nothing here imports it at module level: functions that
need it import it when called and raise an `ImportError` with the
install command when it is missing. ``.safetensors`` files, and state dicts
of NumPy arrays, are read and written without it.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sgld_optax._src.interop.rules import (
    Rule, _flax_to_state_dict, _fmt_path, _module_kinds, _path_tokens,
    _state_dict_to_flax)

PyTree = Any
PathLike = Union[str, "os.PathLike[str]"]


INSTALL_HINT = "pip install 'sgld_optax[torch]'"

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIX = ".safetensors"

# Extensions NumPy lacks, carried through ml_dtypes, with the unsigned-int
# view of the same width used to move the raw bits.
_EXTENSION_DTYPES = {
    "bfloat16": (ml_dtypes.bfloat16, np.int16),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, np.uint8),
    "float8_e4m3fnuz": (ml_dtypes.float8_e4m3fnuz, np.uint8),
    "float8_e5m2": (ml_dtypes.float8_e5m2, np.uint8),
    "float8_e5m2fnuz": (ml_dtypes.float8_e5m2fnuz, np.uint8),
}



# ---------------------------------------------------------------------------
# Optional torch
# ---------------------------------------------------------------------------


def _require_torch(what: str = "this function"):
    """Imports and returns torch, or raises an ImportError with the install hint."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(
            f"{what} needs PyTorch, which is not installed. Install it with: "
            f"{INSTALL_HINT}") from err
    return torch


def _loaded_torch():
    """The torch module if something already imported it, else None."""
    mod = sys.modules.get("torch")
    return mod if mod is not None and hasattr(mod, "Tensor") else None


def _is_tensor(x) -> bool:
    torch = _loaded_torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _is_module(x) -> bool:
    torch = _loaded_torch()
    return torch is not None and isinstance(x, torch.nn.Module)


def _is_nnx_state(x) -> bool:
    """Whether `x` is a `flax.nnx.State` (leaves wrapped in Variables)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.State)


def _tensor_to_numpy(t, name: str) -> np.ndarray:
    """A C-contiguous NumPy copy of a torch tensor, bit for bit."""
    torch = _loaded_torch()
    if t.layout != torch.strided:
        raise TypeError(f"{name}: only dense tensors are supported, got layout "
                        f"{t.layout}.")
    if t.is_quantized:
        raise TypeError(f"{name}: quantized tensors are not supported.")
    if t.device.type == "meta":
        raise ValueError(f"{name}: tensor is on the meta device and holds no "
                         "data.")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    dname = str(t.dtype).removeprefix("torch.")
    if dname in _EXTENSION_DTYPES:
        np_dtype, carrier = _EXTENSION_DTYPES[dname]
        carrier_t = getattr(torch, np.dtype(carrier).name)
        arr = t.contiguous().view(carrier_t).numpy().view(np_dtype)
    else:
        try:
            arr = t.numpy()
        except TypeError as err:
            raise TypeError(f"{name}: dtype {t.dtype} has no NumPy "
                            "counterpart.") from err
    return np.array(arr, copy=True, order="C")


def _numpy_to_tensor(arr: np.ndarray):
    torch = _require_torch("converting to torch tensors")
    arr = np.array(arr, order="C")  # a copy; keeps 0-d arrays 0-d
    for dname, (np_dtype, carrier) in _EXTENSION_DTYPES.items():
        if arr.dtype == np_dtype:
            return torch.from_numpy(arr.view(carrier)).view(
                getattr(torch, dname))
    return torch.from_numpy(arr)


def _numpy_dtype_of(t) -> np.dtype:
    """The NumPy dtype matching a torch dtype (ml_dtypes for extensions)."""
    dname = str(t.dtype).removeprefix("torch.")
    if dname in _EXTENSION_DTYPES:
        return np.dtype(_EXTENSION_DTYPES[dname][0])
    torch = _loaded_torch()
    return torch.empty((), dtype=t.dtype).numpy().dtype


# ---------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------


def _sniff(path: Path) -> Optional[str]:
    """'torch', 'safetensors' or None, from the first bytes of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"  # zip archive written by torch.save
    if head[:1] == b"\x80":
        return "torch"  # legacy pickle-based torch.save
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return None


def _not_a_checkpoint(path, detail=""):
    return ValueError(
        f"{os.fspath(path)!r} is not a checkpoint: expected a file written by "
        f"torch.save ({', '.join(_TORCH_SUFFIXES)}) or a .safetensors file"
        + (f" ({detail})" if detail else "") + ".")


def _load_file(path) -> Mapping:
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint file: {os.fspath(path)!r}")
    if path.is_dir():
        raise _not_a_checkpoint(path, "it is a directory")
    fmt = _sniff(path)
    if fmt is None:
        raise _not_a_checkpoint(path, "unrecognised file contents")
    if fmt == "safetensors":
        from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
        try:
            return st_numpy.load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise _not_a_checkpoint(path, f"unreadable safetensors: {err}") from err
    torch = _require_torch(f"Loading {path.name}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{os.fspath(path)!r} holds objects other than tensors and plain "
            "containers; it is loaded with torch.load(weights_only=True), which "
            "never runs code stored in a file. Save a state dict "
            "(module.state_dict()) instead.") from err
    except Exception as err:  # corrupt or foreign file
        raise _not_a_checkpoint(path, f"torch.load failed: {err}") from err
    if not isinstance(obj, Mapping):
        raise _not_a_checkpoint(
            path, f"it holds a {type(obj).__name__}, not a state dict")
    return obj


def _source_to_numpy(source) -> "collections.OrderedDict[str, np.ndarray]":
    """Turns a path, module or state dict into an ordered dict of NumPy arrays."""
    if isinstance(source, (str, os.PathLike)):
        mapping = _load_file(source)
    elif _is_module(source):
        mapping = source.state_dict()
    elif isinstance(source, Mapping):
        mapping = source
    else:
        raise TypeError(
            "Expected a state dict (a mapping of names to tensors), a "
            "torch.nn.Module or a checkpoint path, got "
            f"{type(source).__name__}.")
    out = collections.OrderedDict()
    problems = []
    for name, value in mapping.items():
        if not isinstance(name, str):
            problems.append(f"{name!r}: keys must be strings")
        elif _is_tensor(value):
            continue
        elif isinstance(value, (np.ndarray, jax.Array)):
            continue
        elif isinstance(value, Mapping):
            problems.append(
                f"{name!r}: holds a nested dict, not a tensor (if this is a "
                f"training checkpoint, pass checkpoint[{name!r}])")
        else:
            problems.append(f"{name!r}: holds a {type(value).__name__}, not a "
                            "tensor")
    if problems:
        raise TypeError("The state dict has entries that are not tensors:\n  "
                        + "\n  ".join(problems))
    if not mapping:
        raise ValueError("The state dict is empty.")
    for name, value in mapping.items():
        if _is_tensor(value):
            out[name] = _tensor_to_numpy(value, name)
        else:
            out[name] = np.array(value, copy=True, order="C")
    return out


def _fit_for_jax(arr: np.ndarray, name: str) -> np.ndarray:
    """Narrows 64-bit arrays when JAX runs without x64, refusing lossy ints."""
    if jax.config.jax_enable_x64 or arr.dtype.itemsize < 8:
        return arr
    kind = arr.dtype.kind
    if kind in "iu":
        target = np.dtype(np.int32 if kind == "i" else np.uint32)
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(
                f"{name}: {arr.dtype} values do not fit in {target}, the widest "
                "integer JAX uses without 64-bit mode; enable it with "
                "jax.config.update('jax_enable_x64', True).")
        return arr.astype(target)
    if kind in "fc":
        target = np.dtype(np.float32 if kind == "f" else np.complex64)
        warnings.warn(
            f"{name}: {arr.dtype} is stored as {target} because JAX runs "
            "without 64-bit mode (jax.config.update('jax_enable_x64', True) "
            "keeps it).", UserWarning, stacklevel=4)
        return arr.astype(target)
    return arr


def _to_jax(tree_np, device):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree_np)
    leaves = [_fit_for_jax(a, _fmt_path(_path_tokens(p))) for p, a in flat]
    tree_np = jax.tree_util.tree_unflatten(treedef, leaves)
    if device is None:
        return jax.tree.map(jnp.asarray, tree_np)
    return jax.device_put(tree_np, device)


# ---------------------------------------------------------------------------
# Public: params
# ---------------------------------------------------------------------------


def params_from_torch(state_dict_or_path: Union[PathLike, Mapping[str, Any], Any],
                      *, like: Optional[PyTree] = None,
                      rules: Optional[Sequence[Rule]] = None,
                      device: Optional[Any] = None) -> PyTree:
    r"""Converts a PyTorch state dict or checkpoint file into Flax params.

    Names and layouts follow the usual PyTorch to Flax conventions: dotted
    names become nested dicts, `layers.0` becomes `layers_0`, a 2-D `weight`
    becomes a `kernel`, norm-layer `weight` becomes `scale`,
    `Embedding.weight` becomes `embedding`, `running_mean` and `running_var`
    go to the `batch_stats` collection as `mean` and `var`, and
    `num_batches_tracked` is dropped. Legacy `gamma` and `beta` names are
    read as `weight` and `bias`.

    Whether a weight is transposed on its way to a `kernel` is decided by
    the type of the module holding it when `state_dict_or_path` is the
    `torch.nn.Module` itself: an `nn.Linear` weight `(out, in)` is
    transposed to `(in, out)`, a convolution weight goes from `(O, I, *K)`
    to `(*K, I, O)`, and a weight of transformers' `Conv1D` (GPT-2's
    projections), already stored `(in, out)`, is kept; a weight of any other
    module type needs a rule. A bare state dict or file carries no module
    types: its 2-D weights are read as `nn.Linear` weights and those with
    more dimensions as convolution weights. The shape never decides, so a
    square weight is treated as the others of its kind.

    `rules` (a list of `Rule`, such as `gpt2_rules()`) place tensors
    explicitly: a Flax path and a layout per tensor (transpose or keep,
    split a fused tensor into several leaves, unflatten an axis into heads),
    ties, and tensors to drop. The first rule whose pattern matches a name
    applies; names no rule matches follow the conventions above.

    With `like` (a Flax params pytree, or the variables dict
    `{"params": ..., "batch_stats": ...}`, of arrays or
    `jax.ShapeDtypeStruct`), the result has exactly the structure of
    `like`. Names are matched first literally, then ignoring `_N` vs `.N`,
    then also ignoring the `layers` level that `flax.linen.Sequential`
    adds. Every leaf must be matched: leaves nothing goes to, tensors that
    go nowhere, shape mismatches, tied tensors that differ and undecided
    layouts are all reported in one `CheckpointMismatchError`.

    Without `like`, the names decide: a 1-D `weight` becomes `scale`, a 2-D
    `weight` becomes `embedding` when it belongs to an `nn.Embedding` (or,
    in a bare state dict, when its module name contains `emb` or is
    `wte`/`wpe`), else `kernel`; an index with no name before it (a
    top-level `nn.Sequential`) becomes `layers_N`; rules give their own
    paths. The result is the params dict, or
    `{"params": ..., "batch_stats": ...}` when the checkpoint has BatchNorm
    running statistics. Pass `like` whenever the model has anything
    unusual.

    Dtypes are kept (bfloat16 stays bfloat16), and the conversion moves
    bits: nothing is rounded. When JAX runs without 64-bit mode, int64
    tensors become int32 (an error if a value does not fit) and float64
    ones float32 (with a warning).

    Args:
      state_dict_or_path: a mapping of names to `torch.Tensor` (on any
        device, possibly non-contiguous or requiring grad) or NumPy arrays; a
        `torch.nn.Module` (its `state_dict()`, with its module types); or a
        path to a `.pt`, `.pth` or `.bin` file written by `torch.save` (read
        with `torch.load(weights_only=True)`, which never runs code stored
        in the file) or to a `.safetensors` file (read without torch). The
        format is recognised from the file's contents.
      like: optional Flax params or variables whose structure and shapes the
        result must have; or a `flax.nnx.State` (e.g. `nnx.state(model,
        nnx.Param)`), read through `nnx.to_pure_dict`, in which case the
        result is a new `nnx.State` like it (`nnx.update(model, result)`
        loads it).
      rules: optional sequence of `Rule`s, tried in order before the
        conventions.
      device: optional `jax.Device` or `jax.sharding.Sharding` (or a
        pytree of them matching the result) to place the arrays on;
        default: JAX's default device.

    Returns:
      A pytree of `jax.Array` with the structure of `like` if given, else
      a params dict, or a variables dict when there are batch statistics.

    Raises:
      CheckpointMismatchError: if names, shapes or layouts do not line up
        (lists every problem).
      FileNotFoundError: if the path does not exist.
      ValueError: if the file is not a checkpoint, holds objects other than
        tensors, or the state dict is empty.
      TypeError: if a value in the state dict is not a tensor, or `rules`
        holds something other than `Rule`s.
      ImportError: if a torch file is given and torch is not installed.

    Examples:
      >>> import torch, flax.linen as nn, jax, jax.numpy as jnp
      >>> from sgld_optax import torch_interop
      >>> lin = torch.nn.Linear(3, 2)
      >>> params = torch_interop.params_from_torch(lin.state_dict())
      >>> params["kernel"].shape
      (3, 2)
      >>> like = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> params = torch_interop.params_from_torch(lin.state_dict(), like=like)
      >>> params = torch_interop.params_from_torch(
      ...     lin.state_dict(), like=like,
      ...     rules=[torch_interop.Rule(r"weight", "kernel", "transpose")])
    """
    if _is_nnx_state(like):
        from flax import nnx
        pure = params_from_torch(state_dict_or_path,
                                 like=nnx.to_pure_dict(like), rules=rules,
                                 device=device)
        state = jax.tree.map(lambda x: x, like)  # new Variables, same tree
        nnx.replace_by_pure_dict(state, pure)
        return state
    kinds = (_module_kinds(state_dict_or_path)
             if _is_module(state_dict_or_path) else None)
    sd = _source_to_numpy(state_dict_or_path)
    tree = _state_dict_to_flax(sd, like, rules, kinds)
    return _to_jax(tree, device)


class _TorchSpec(NamedTuple):
    shape: tuple
    dtype: np.dtype
    value: Any  # the original tensor or array


def _torch_spec(like) -> "collections.OrderedDict[str, _TorchSpec]":
    if isinstance(like, (str, os.PathLike)):
        sd = _source_to_numpy(like)
        return collections.OrderedDict(
            (n, _TorchSpec(a.shape, a.dtype, a)) for n, a in sd.items())
    if _is_module(like):
        like = like.state_dict()
    if not isinstance(like, Mapping):
        raise TypeError(
            "like must be a torch state dict, a torch.nn.Module or a "
            f"checkpoint path, got {type(like).__name__}.")
    spec = collections.OrderedDict()
    for name, v in like.items():
        if _is_tensor(v):
            spec[name] = _TorchSpec(tuple(v.shape), _numpy_dtype_of(v), v)
        elif isinstance(v, (np.ndarray, jax.Array)):
            spec[name] = _TorchSpec(tuple(v.shape), np.dtype(v.dtype), v)
        else:
            raise TypeError(f"like[{name!r}] is a {type(v).__name__}, not a "
                            "tensor.")
    return spec



def _flax_to_state_dict_like(params, like, rules):
    """`_flax_to_state_dict` with the template `like` read here."""
    if like is None:
        return _flax_to_state_dict(params, None, rules)
    kinds = _module_kinds(like) if _is_module(like) else None
    spec = _torch_spec(like)
    out = _flax_to_state_dict(params, spec, rules, kinds)
    for name, arr in out.items():
        if arr is None:  # kept by the template only: buffers, dropped tensors
            v = spec[name].value
            out[name] = (_tensor_to_numpy(v, name) if _is_tensor(v)
                         else np.array(v, copy=True))
    return out


def params_to_torch(params: PyTree, *,
                    like: Union[PathLike, Mapping[str, Any], Any, None] = None,
                    rules: Optional[Sequence[Rule]] = None,
                    ) -> "dict[str, Any]":
    r"""Converts Flax params back into a PyTorch state dict.

    The exact inverse of `params_from_torch`: with `like` (the torch
    module, its state dict, or a checkpoint path) the result has the same
    names, order, shapes and dtypes as `like`, so
    `module.load_state_dict(result, strict=True)` accepts it, and a round
    trip torch -> JAX -> torch is bitwise identical. Layouts are decided as
    in `params_from_torch` (by `rules`, then by the module types of `like`
    when it is a module, then by the conventions) and undone: split tensors
    are joined again, tied tensors each get their leaf. What the Flax side
    does not keep (`num_batches_tracked`, and the tensors a rule drops,
    such as causal-mask buffers) is copied from `like`.

    Without `like`, names are rebuilt by inverting the naming conventions
    (`layers_0` -> `layers.0`, `kernel`/`scale`/`embedding` -> `weight`,
    `batch_stats` `mean`/`var` -> `running_mean`/`running_var`, with a
    `num_batches_tracked` of 0 added next to them), 2-D kernels are
    transposed as `nn.Linear` weights, and dtypes are those of `params`.
    Rules need `like`, whose names they map.

    Args:
      params: Flax params, or variables `{"params": ..., "batch_stats":
        ...}`, of JAX or NumPy arrays; or a `flax.nnx.State`, read through
        `nnx.to_pure_dict`.
      like: optional `torch.nn.Module`, torch state dict, or checkpoint
        path giving the target names, shapes and dtypes.
      rules: optional sequence of `Rule`s, the same as given to
        `params_from_torch`.

    Returns:
      An ordered `dict` of names to contiguous CPU `torch.Tensor`.

    Raises:
      CheckpointMismatchError: if `like` is given and names, shapes or
        layouts do not line up (lists every problem).
      TypeError: if `rules` is given without `like`.
      ImportError: if torch is not installed.

    Examples:
      >>> import torch
      >>> from sgld_optax import torch_interop
      >>> lin = torch.nn.Linear(3, 2)
      >>> params = torch_interop.params_from_torch(lin)
      >>> lin.load_state_dict(torch_interop.params_to_torch(params, like=lin))
      <All keys matched successfully>
    """
    _require_torch("params_to_torch")
    if _is_nnx_state(params):
        from flax import nnx
        params = nnx.to_pure_dict(params)
    sd = _flax_to_state_dict_like(params, like, rules)
    return collections.OrderedDict(
        (name, _numpy_to_tensor(arr)) for name, arr in sd.items())


def save_torch_checkpoint(params: PyTree, path: PathLike, *,
                          like: Union[PathLike, Mapping[str, Any], Any, None] = None,
                          rules: Optional[Sequence[Rule]] = None,
                          ) -> Path:
    """Writes Flax params as a PyTorch checkpoint file.

    Names and layouts are those of `params_to_torch`. A path ending in
    `.safetensors` is written with the `safetensors` package and does not
    need torch; `.pt`, `.pth`, `.bin` and `.ckpt` are written with
    `torch.save`. The file is written to a temporary name first and moved
    into place, so a failure never leaves a partial checkpoint.

    Args:
      params: Flax params or variables.
      path: destination file.
      like: optional `torch.nn.Module`, torch state dict or checkpoint path
        giving the target names, shapes and dtypes.
      rules: optional sequence of `Rule`s, as for `params_to_torch`.

    Returns:
      The path written, as a `pathlib.Path`.

    Raises:
      ValueError: for an unknown file extension.
      CheckpointMismatchError: if `like` does not line up with `params`.
      ImportError: when writing a torch file without torch installed.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sgld_optax import torch_interop
      >>> params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "fc.safetensors")
      >>> torch_interop.save_torch_checkpoint(params, path).name
      'fc.safetensors'
    """
    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    if suffix != _SAFETENSORS_SUFFIX and suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"Cannot tell the format of {os.fspath(path)!r}: use a "
            f".safetensors or {'/'.join(_TORCH_SUFFIXES)} extension.")
    if suffix != _SAFETENSORS_SUFFIX:
        torch = _require_torch(f"Writing {path.name}")
    sd = _flax_to_state_dict_like(params, like, rules)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        if suffix == _SAFETENSORS_SUFFIX:
            from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
            st_numpy.save_file(dict(sd), tmp, metadata={"format": "pt"})
        else:
            torch.save(collections.OrderedDict(
                (n, _numpy_to_tensor(a)) for n, a in sd.items()), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


