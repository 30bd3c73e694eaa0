"""Fails the docs build when the API pages and the public names disagree.

Every name in `sgld_optax.__all__` and `sgld_optax.torch_interop.__all__`
must have a docstring and an entry (`::: module.name`) in the docs pages,
and every such entry must name a public name (an entry for a name that was
removed or made private is reported too).
"""

import importlib
import pathlib
import re

from mkdocs.exceptions import PluginError

MODULES = ("sgld_optax", "sgld_optax.torch_interop")


def undocumented(docs_dir) -> list[str]:
    """Public names without a docstring or an entry, and entries of non-public names."""
    text = "\n".join(p.read_text() for p in pathlib.Path(docs_dir).glob("*.md"))
    entries = set(re.findall(r"^:::\s*([\w.]+)", text, flags=re.M))
    problems = []
    public = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            public.add(f"{module_name}.{name}")
            obj = getattr(module, name)
            if not (getattr(obj, "__doc__", None) or "").strip():
                problems.append(f"{module_name}.{name} has no docstring")
            if f"{module_name}.{name}" not in entries:
                problems.append(f"{module_name}.{name} has no '::: "
                                f"{module_name}.{name}' entry in docs/")
    for entry in sorted(entries - public):
        problems.append(f"'::: {entry}' in docs/ is not a public name of "
                        + " or ".join(MODULES))
    return problems


def on_config(config):
    problems = undocumented(config["docs_dir"])
    if problems:
        raise PluginError("the API pages and the public names disagree:\n  "
                          + "\n  ".join(problems))
    return config
