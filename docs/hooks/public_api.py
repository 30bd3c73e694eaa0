"""Fails the docs build when a public name is undocumented.

Every name in ``sgld_optax.__all__`` and ``sgld_optax.torch_interop.__all__``
must have a docstring and an entry (``::: module.name``) in the API pages.
"""

import importlib
import pathlib
import re

from mkdocs.exceptions import PluginError

MODULES = ("sgld_optax", "sgld_optax.torch_interop")


def undocumented(docs_dir) -> list[str]:
    """Public names without a docstring or without an API entry."""
    text = "\n".join(p.read_text() for p in pathlib.Path(docs_dir).glob("*.md"))
    entries = set(re.findall(r"^:::\s*([\w.]+)", text, flags=re.M))
    problems = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (getattr(obj, "__doc__", None) or "").strip():
                problems.append(f"{module_name}.{name} has no docstring")
            if f"{module_name}.{name}" not in entries:
                problems.append(f"{module_name}.{name} has no '::: "
                                f"{module_name}.{name}' entry in docs/")
    return problems


def on_config(config):
    problems = undocumented(config["docs_dir"])
    if problems:
        raise PluginError("undocumented public names:\n  "
                          + "\n  ".join(problems))
    return config
