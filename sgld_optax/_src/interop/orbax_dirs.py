"""Orbax checkpoint directories, read into params pytrees.

orbax-checkpoint comes with Flax; it is imported when a directory is read.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sgld_optax._src import base


def _name(key: tuple) -> str:
    """An orbax flat key (a tuple of names) as `base.leaf_name` writes a
    leaf's path."""
    return "".join(f"[{k!r}]" for k in key) or "<root>"


def _orbax():
    """`orbax.checkpoint`, with the parts `restore` uses, or an ImportError
    that says which version it needs."""
    import orbax.checkpoint as ocp
    try:
        _ = (ocp.path.format_utils.is_pytree_checkpoint, ocp.tree.to_flat_dict,
             ocp.metadata.ArrayMetadata, ocp.StandardCheckpointHandler,
             ocp.args.StandardRestore)
    except AttributeError as err:
        version = getattr(ocp, "__version__", "of unknown version")
        raise ImportError(
            "reading orbax checkpoint directories needs a newer "
            f"orbax-checkpoint (tested with 0.12.8; found {version}): "
            f"{err}. pip install -U orbax-checkpoint") from err
    return ocp


def restore(path, like=None):
    """The params an orbax checkpoint directory holds, as jax arrays.

    `path` is a pytree checkpoint (written by orbax's `StandardCheckpointer`
    or `PyTreeCheckpointer`, marked by its `_METADATA` file), or a
    `CheckpointManager` step holding one such item. The arrays are restored
    with a target built from `like` (its structure, shapes and dtypes,
    checked against the saved ones first) or, without `like`, from the
    saved metadata; either way onto one device (a `like` leaf's own
    sharding, else the default device), not the saved shardings, which need
    not exist where the checkpoint is read.
    """
    ocp = _orbax()
    from etils import epath

    name = os.fspath(path)
    is_pytree = ocp.path.format_utils.is_pytree_checkpoint
    directory = epath.Path(path)
    if not is_pytree(directory):
        items = sorted(p for p in directory.iterdir()
                       if p.is_dir() and is_pytree(p))
        if len(items) != 1:
            found = (f" ({name!r} holds {len(items)}: "
                     + ", ".join(p.name for p in items)
                     + "; pass the directory of the one to read)"
                     if items else "")
            raise ValueError(
                f"checkpoint {name!r} is a directory but not an orbax "
                "checkpoint: expected a pytree checkpoint (a directory with "
                f"orbax's {ocp.path.format_utils.PYTREE_METADATA_FILE} file, "
                "as StandardCheckpointer and PyTreeCheckpointer write), or "
                "a CheckpointManager step directory holding exactly one "
                f"such item{found}.")
        directory = items[0]

    device = jax.config.jax_default_device
    if device is None:
        device = jax.devices()[0]
    elif isinstance(device, str):
        device = jax.devices(device)[0]
    default = jax.sharding.SingleDeviceSharding(device)

    def listed(keys):
        # orbax's flat keys are tuples of names: named as the params' leaves.
        return base.listed(_name(k) for k in keys)

    handler = ocp.StandardCheckpointHandler()
    with ocp.Checkpointer(handler) as checkpointer:
        try:
            # The handler's own metadata: a manager's item directory has
            # no step metadata of its own to read.
            tree = handler.metadata(directory).tree
        except (FileNotFoundError, NotImplementedError, ValueError,
                TypeError) as e:
            raise ValueError(f"checkpoint {name!r}: orbax could not read the "
                             f"metadata of {os.fspath(directory)!r}: {e}"
                             ) from e
        saved = ocp.tree.to_flat_dict(tree)
        not_arrays = [k for k, m in saved.items()
                      if not isinstance(m, ocp.metadata.ArrayMetadata)]
        if not_arrays:
            raise ValueError(
                f"checkpoint {name!r} holds leaves that are not arrays "
                f"({listed(not_arrays)}); params must be arrays.")
        if like is None:
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                               sharding=default), tree)
        else:
            wanted = ocp.tree.to_flat_dict(like)
            problems = []
            missing = [k for k in wanted if k not in saved]
            if missing:
                problems.append("in like but not saved: " + listed(missing))
            extra = [k for k in saved if k not in wanted]
            if extra:
                problems.append(
                    "saved but not in like: " + listed(extra) + " (the "
                    "directory must hold the params alone: save them on "
                    "their own, or as their own CheckpointManager item, "
                    "and pass that directory)")
            shapes = [k for k, x in wanted.items()
                      if k in saved and tuple(saved[k].shape) != np.shape(x)]
            problems += [
                f"{_name(k)} has shape {tuple(saved[k].shape)} saved and "
                f"{np.shape(wanted[k])} in like" for k in shapes[:10]]
            if len(shapes) > 10:
                problems.append(f"and {len(shapes) - 10} more shapes differ")
            if problems:
                raise ValueError(
                    f"checkpoint {name!r} does not match like=: "
                    + "; ".join(problems) + ".")
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    np.shape(x), jnp.result_type(x),
                    sharding=(default if getattr(x, "sharding", None) is None
                              else x.sharding)),
                like)
        return checkpointer.restore(directory,
                                    args=ocp.args.StandardRestore(target))
