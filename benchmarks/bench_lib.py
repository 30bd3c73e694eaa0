"""Shared pieces of the benchmarks: parameter shapes, timers, and the steps.

``run.py`` (CPU, writes ``docs/benchmarks.md``) and ``gpu.py`` (CUDA) both
import this module; it is not part of the package.

Each optimizer step is timed the same way on both sides: the parameters are a
set of leaves of realistic shapes (one transformer block with its
embedding), the gradients are fixed random arrays (only the step is timed,
not a backward pass), the localization is nonzero so both samplers keep the
initial parameters, and every call waits for its result
(``block_until_ready`` in JAX, a synchronous call or ``cuda.synchronize`` in
PyTorch). The two sides are timed interleaved, call by call, so that any
change in the machine's load hits both alike; a table reports medians.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

# Step hyperparameters: the values do not change the work done per step.
LEARNING_RATE = 1e-4
NBETA = 10.0
LOCALIZATION = 100.0
SKETCH_DIM = 1024
MODES = ("plain", "metrics", "sketch")
# Our samplers timed against their devinterp counterparts (see
# ``devinterp_optimizer``).
SAMPLERS = ("sgld", "rmsprop_sgld")
# Bytes per float32 parameter a step must move: read w, g, w0 and write w;
# RMSprop also reads and writes its running mean.
STEP_BYTES = {"sgld": 16, "rmsprop_sgld": 24}
# Quick runs use three leaves instead of eleven: less to compile.
FEW_LEAVES = False


# --------------------------------------------------------------------------
# Sizes and shapes.

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"4M"`` -> 4 * 2**20, ``"64K"`` -> 65536, ``"20000"`` -> 20000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 20000, 64K, 4M)")
    n = int(round(float(m.group(1)) * _SUFFIX[m.group(2).upper()]))
    if n < 64:
        raise ValueError(f"size {text!r} is too small (at least 64)")
    return n


def size_label(n: int) -> str:
    """A short label for a requested size: 4194304 -> '4M'."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def leaf_shapes(n: int) -> Dict[str, tuple]:
    """Leaf shapes of about ``n`` parameters: a transformer block of width d.

    An embedding (4d, d), LayerNorm scales, attention (d, 3d) and (d, d),
    an MLP (d, 4d) and (4d, d), and their biases: 16 d^2 + 11 d parameters,
    with d = sqrt(n / 16) (d = 512 for n = 4M). With ``FEW_LEAVES`` set,
    three leaves of 16 d^2 + 12 d parameters.
    """
    d = max(2, int(round(math.sqrt(n / 16.0))))
    if FEW_LEAVES:
        return {"embed": (4 * d, d), "mlp_in": (d, 12 * d),
                "mlp_in_bias": (12 * d,)}
    return {
        "embed": (4 * d, d),
        "ln1_scale": (d,),
        "attn_qkv": (d, 3 * d),
        "attn_qkv_bias": (3 * d,),
        "attn_out": (d, d),
        "attn_out_bias": (d,),
        "ln2_scale": (d,),
        "mlp_in": (d, 4 * d),
        "mlp_in_bias": (4 * d,),
        "mlp_out": (4 * d, d),
        "mlp_out_bias": (d,),
    }


def make_arrays(n: int, seed: int = 0):
    """(params, grads) as dicts of float32 NumPy arrays of ``leaf_shapes(n)``."""
    rng = np.random.default_rng(seed)
    shapes = leaf_shapes(n)
    params = {k: (0.02 * rng.standard_normal(s, dtype=np.float32))
              for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32)
             for k, s in shapes.items()}
    return params, grads


def num_params(tree) -> int:
    return int(sum(np.size(x) for x in tree.values()))


# --------------------------------------------------------------------------
# Timing.

def interleaved(fns: Dict[str, Callable[[], None]], repeats: int,
                warmup: int = 2) -> Dict[str, List[float]]:
    """Times each function ``repeats`` times, in turns, in seconds.

    All functions are warmed up first; then round ``r`` calls every function
    once (in reversed order on odd rounds), so that slow phases of a shared
    machine fall on every function alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    gc.collect()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def minor_faults_per_step(call: Callable[[], None], steps_per_call: int = 1,
                          calls: int = 3) -> Optional[float]:
    """Minor page faults of this process per step, over ``calls`` calls.

    A page the process touches for the first time since the system gave it
    (a fresh ``mmap``) costs a minor fault and its zeroing. ``None`` where
    ``resource`` is unavailable (not Unix).
    """
    try:
        import resource
    except ImportError:
        return None
    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        call()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return (after - before) / (calls * steps_per_call)


def median_ms(samples: Sequence[float]) -> float:
    return float(np.median(samples)) * 1e3


# --------------------------------------------------------------------------
# sgld_optax side.

def _nbytes(x) -> int:
    """Bytes of one state leaf (typed PRNG keys count their key data)."""
    import jax
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return int(x.size) * int(x.dtype.itemsize)


@dataclasses.dataclass
class OursStep:
    """A jitted sampler step with donated params and state, ready to call."""

    call: Callable[[], None]
    state_bytes: int          # bytes of the sampler's state pytree
    temp_bytes: Optional[int]  # XLA scratch of the compiled step
    compile_s: float
    hlo_text: str = ""        # the compiled step's optimized HLO


def ours_transformation(sampler: str, mode: str):
    """``so.sgld`` or ``so.rmsprop_sgld`` with the benchmark's settings."""
    import sgld_optax as so

    factory = {"sgld": so.sgld, "rmsprop_sgld": so.rmsprop_sgld}[sampler]
    return factory(LEARNING_RATE, nbeta=NBETA, localization=LOCALIZATION,
                   save_metrics=(mode == "metrics"),
                   sketch_dim=(SKETCH_DIM if mode == "sketch" else None),
                   key=0)


def ours_state_bytes(sampler: str, mode: str, params_np) -> int:
    """Bytes of the state ``init`` builds for ``params_np``."""
    import jax
    import jax.numpy as jnp

    tx = ours_transformation(sampler, mode)
    state = tx.init({k: jnp.asarray(v) for k, v in params_np.items()})
    return sum(_nbytes(x) for x in jax.tree_util.tree_leaves(state))


def ours_step(mode: str, params_np, grads_np, device=None, inner: int = 1,
              sampler: str = "sgld") -> OursStep:
    """Builds our step; each ``call()`` takes ``inner`` steps, then waits."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = ours_transformation(sampler, mode)
    put = (lambda a: jax.device_put(a, device)) if device is not None else (
        jnp.asarray)
    params = {k: put(v) for k, v in params_np.items()}
    grads = {k: put(v) for k, v in grads_np.items()}
    # The state's w0 must not share buffers with the params, since both are
    # donated to the step: give init its own copy.
    state = tx.init({k: put(v) for k, v in params_np.items()})
    state_bytes = sum(_nbytes(x) for x in jax.tree_util.tree_leaves(state))

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    temp, hlo = None, ""
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, grads).compile()
    try:  # both are backend dependent
        analysis = compiled.memory_analysis()
        temp = int(analysis.temp_size_in_bytes) if analysis is not None else None
        hlo = compiled.as_text() or ""
    except Exception:
        pass
    holder = [params, state]

    def call():
        for _ in range(inner):
            holder[0], holder[1] = compiled(holder[0], holder[1], grads)
        jax.block_until_ready(holder)

    call()
    compile_s = time.perf_counter() - t0
    return OursStep(call, state_bytes, temp, compile_s, hlo)


def floor_steps(params_np, grads_np, device=None, inner: int = 1):
    """The floor: a fused update without noise, and a copy of the same bytes.

    Returns ``(update, copy)`` callables. The update is
    ``w <- w - (lr/2)(nbeta g + loc (w - w0))`` over the same leaves, jitted
    with ``w`` donated; the copy writes the params' bytes into a donated
    buffer of the same size.
    """
    import jax
    import jax.numpy as jnp

    put = (lambda a: jax.device_put(a, device)) if device is not None else (
        jnp.asarray)
    p = {k: put(v) for k, v in params_np.items()}
    w0 = {k: put(v) for k, v in params_np.items()}
    g = {k: put(v) for k, v in grads_np.items()}
    h = 0.5 * LEARNING_RATE

    def update(p, g, w0):
        return jax.tree.map(
            lambda w, gg, c: w - h * (NBETA * gg + LOCALIZATION * (w - c)),
            p, g, w0)

    upd = jax.jit(update, donate_argnums=0)
    cpy = jax.jit(lambda dst, src: jax.tree.map(lambda s: s + 0.0, src),
                  donate_argnums=0)
    hp = [p]
    hc = [{k: put(np.zeros_like(v)) for k, v in params_np.items()}]

    def call_update():
        for _ in range(inner):
            hp[0] = upd(hp[0], g, w0)
        jax.block_until_ready(hp[0])

    def call_copy():
        for _ in range(inner):
            hc[0] = cpy(hc[0], w0)
        jax.block_until_ready(hc[0])

    return call_update, call_copy


# --------------------------------------------------------------------------
# devinterp side.

def _torch_tensors(obj, seen, out):
    import torch
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _torch_tensors(v, seen, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _torch_tensors(v, seen, out)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            _torch_tensors(v, seen, out)


def devinterp_state_bytes(opt) -> int:
    """Bytes of the tensors a devinterp optimizer holds beyond its params.

    Per-parameter state (``initial_param``, a prior's centre, RMSprop's
    ``square_avg``), the count-sketch tables (int64 bucket and float32 sign
    per parameter) and buffers, and the metrics accumulators.
    """
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    tensors: list = []
    _torch_tensors(dict(opt.state), seen, tensors)
    for group in opt.param_groups:
        _torch_tensors({k: v for k, v in group.items() if k != "params"},
                       seen, tensors)
    for attr in ("_sketch", "_sketch_buf"):
        _torch_tensors(getattr(opt, attr, None), seen, tensors)
    return int(sum(t.numel() * t.element_size() for t in tensors))


@dataclasses.dataclass
class TheirsStep:
    call: Callable[[], None]
    state_bytes: int


def devinterp_optimizer(sampler: str, params, *, lr: float, nbeta: float,
                        localization: float, save_metrics: bool = False,
                        sketch_dim: Optional[int] = None):
    """devinterp's counterpart of ``sampler`` over the torch ``params``.

    ``"sgld"``: its ``SGLD`` optimizer; ``"rmsprop_sgld"``:
    ``SGMCMC.rmsprop_sgld`` with its default ``alpha`` and ``eps`` (ours are
    the same).
    """
    from devinterp.optim.sgld import SGLD
    from devinterp.optim.sgmcmc import SGMCMC

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if sampler == "sgld":
            return SGLD(params, lr=lr, nbeta=nbeta, localization=localization,
                        save_metrics=save_metrics, sketch_dim=sketch_dim)
        if sampler == "rmsprop_sgld":
            return SGMCMC.rmsprop_sgld(
                params, lr=lr, nbeta=nbeta, localization=localization,
                save_metrics=save_metrics, sketch_dim=sketch_dim)
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def devinterp_step(mode: str, params_np, grads_np, device: str = "cpu",
                   inner: int = 1, sampler: str = "sgld") -> TheirsStep:
    """Builds devinterp's step; each ``call()`` takes ``inner`` steps.

    The state is measured after one step, so that state devinterp creates
    on its first step (RMSprop's running mean) counts.
    """
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(v.copy()).to(device))
              for v in params_np.values()]
    for p, g in zip(params, grads_np.values()):
        p.grad = torch.from_numpy(g.copy()).to(device)
    opt = devinterp_optimizer(
        sampler, params, lr=LEARNING_RATE, nbeta=NBETA,
        localization=LOCALIZATION, save_metrics=(mode == "metrics"),
        sketch_dim=(SKETCH_DIM if mode == "sketch" else None))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (
        lambda: None)

    def call():
        for _ in range(inner):
            opt.step()
        sync()

    opt.step()
    return TheirsStep(call, devinterp_state_bytes(opt))


# --------------------------------------------------------------------------
# Machine and versions.

def _version(module: str) -> str:
    """The installed version of ``module``, or its ``__version__`` when it is
    importable without being installed (e.g. from ``PYTHONPATH``)."""
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        pass
    try:
        import importlib
        return str(importlib.import_module(module).__version__)
    except Exception:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        # The page and plot a previous run wrote are not changes to what
        # is measured.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".",
             ":(exclude)docs/benchmarks.md",
             ":(exclude)docs/benchmark_step_time.png"],
            cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        return rev.stdout.strip() + (" (with local changes)"
                                     if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> Dict[str, str]:
    import jax
    import torch
    env = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "jax backend": jax.default_backend(),
        "jax devices": ", ".join(str(d) for d in jax.devices()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_revision(),
    }
    for name in ("sgld_optax", "jax", "jaxlib", "optax", "numpy", "torch",
                 "devinterp"):
        env[name] = _version(name)
    return env


def md_table(header, rows) -> str:
    """A Markdown table of ``rows`` (sequences of cells) under ``header``."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_block(path: str, generated: str, begin: str, end: str,
                new_page: str) -> None:
    """Writes ``generated`` between the markers ``begin`` and ``end`` of a page.

    Text outside the markers is kept. A page without them gets the block at
    its end; a missing page is created as ``new_page`` followed by the block.
    """
    block = f"{begin}\n\n{generated}\n\n{end}"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1]
            text = head + block + tail
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = new_page + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def _cpu_seconds():
    """(busy CPU seconds of the whole machine, of this process), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system


class LoadMonitor:
    """How much of the machine's CPU other processes used over a stretch.

    ``others()`` is the busy CPU time of the whole machine minus this
    process's own, as a fraction of the wall time times the cores (Linux
    only; ``None`` elsewhere).
    """

    def __init__(self):
        self.start = _cpu_seconds()
        self.t0 = time.perf_counter()

    def others(self) -> Optional[float]:
        end = _cpu_seconds()
        if self.start is None or end is None:
            return None
        wall = time.perf_counter() - self.t0
        used = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, used) / (wall * (os.cpu_count() or 1))


def wait_for_idle(max_wait_s: float, threshold: float = 0.1,
                  window_s: float = 5.0) -> Optional[float]:
    """Waits until other processes use < ``threshold`` of the CPU over a
    ``window_s`` window, for at most ``max_wait_s``; returns the last share."""
    deadline = time.perf_counter() + max_wait_s
    share = None
    while True:
        mon = LoadMonitor()
        time.sleep(window_s)
        share = mon.others()
        if share is None or share < threshold:
            return share
        if time.perf_counter() >= deadline:
            return share
        log(f"[idle] other processes use {share:.0%} of the CPU; waiting")


def run_quietly(fn, *args, **kwargs):
    """Calls ``fn`` with devinterp's deprecation warning and JAX's note on
    donated buffers it could not reuse silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Some donated buffers")
        return fn(*args, **kwargs)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"{time.perf_counter() - _T0:7.1f}s {msg}", file=sys.stderr,
          flush=True)


# --------------------------------------------------------------------------
# Where the time goes: XLA's own per-kernel timings.

_COMP_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)*?) "
                    r"([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def hlo_computations(text: str):
    """The computations of HLO text: ``({name: body}, name of the entry)``."""
    comps, entry, name, body = {}, None, None, []
    for line in text.splitlines():
        if name is None:
            m = _COMP_HEADER.match(line)
            if m:
                name, body = m.group(1), []
                if line.startswith("ENTRY"):
                    entry = name
        elif line.strip() == "}":
            comps[name] = "\n".join(body)
            name = None
        else:
            body.append(line)
    return comps, entry


@dataclasses.dataclass
class EntryInstruction:
    """One instruction of the entry computation of optimized HLO."""

    result: str   # its result type, e.g. ``f32[1024,1024]{1,0}``
    opcode: str   # ``fusion``, ``copy``, ``parameter``, ...
    called: str   # the text of the computations it calls, recursively
    tags: set     # what those compute (see ``_tags``)
    op_name: str  # JAX's name for the operation, or the opcode


def entry_instructions(hlo_text: str) -> Dict[str, EntryInstruction]:
    """The instructions of the entry computation of optimized HLO, by name.

    Each kernel of a compiled program is one of them; ``called`` and
    ``tags`` say what a fusion computes.
    """
    comps, entry = hlo_computations(hlo_text)

    def called_text(text, depth=0):
        return "".join(comps.get(c, "") + "\n"
                       + (called_text(comps.get(c, ""), depth + 1)
                          if depth < 3 else "")
                       for c in _CALLS.findall(text))

    out = {}
    for line in comps.get(entry, "").splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, result, opcode, rest = m.groups()
        callee = _CALLS.search(rest)
        body = comps.get(callee.group(1), "") if callee else ""
        op = re.search(r'op_name="([^"]*)"', rest)
        out[name] = EntryInstruction(
            result=result, opcode=opcode, called=called_text(rest),
            tags=_tags(body, comps) | _tags(f" {opcode}(", comps),
            op_name=op.group(1) if op else opcode)
    return out


def _tags(body: str, comps, depth=0) -> set:
    tags = set()
    if "shift-left(" in body and body.count("xor(") >= 8:
        tags.add("threefry")
    if "2246822507" in body:  # murmur3 finaliser constant: sketch hash
        tags.add("hash")
    if ("count-leading-zeros(" in body or "log-plus-one(" in body
            or " log(" in body):
        tags.add("transform")
    if " scatter(" in body:
        tags.add("scatter")
    if " reduce(" in body or "reduce_sum" in body or "__ynn_fusion" in body:
        tags.add("reduce")
    if depth < 3:
        for callee in set(_CALLS.findall(body)):
            if callee in comps:
                tags |= _tags(comps[callee], comps, depth + 1)
    return tags


def xla_kernel_profile(call: Callable[[], None], hlo_text: str,
                       calls: int = 5, top: int = 12,
                       steps_per_call: int = 1):
    """Per-kernel wall time of a compiled step, from JAX's profiler.

    Runs ``call`` ``calls`` times under ``jax.profiler.trace`` and matches
    the trace's events to the instructions of the compiled HLO's entry
    computation. Each kernel is tagged by what its fused computation
    contains: ``threefry`` (noise bits), ``transform`` (the normal
    transform's logarithm), ``reduce``, ``scatter``, ``hash`` (sketch buckets).

    With ``steps_per_call`` > 1 (``call`` runs the step that many times)
    the times are per step.

    Returns:
      A dict: ``top``, rows ``(name, ms per step, tags, op_name)`` longest
      first (at most ``top``); ``total_ms``, the sum over every matched
      kernel (kernels may overlap on several threads); ``by_kind``, that
      sum split by kind (see ``_by_kind``); ``kernels_with_threefry``, how
      many kernels of the step compute Threefry bits. ``None`` if the
      profiler wrote no trace.
    """
    import glob
    import gzip
    import json
    import shutil
    import tempfile

    import jax

    instrs = {name: (i.tags, i.op_name)
              for name, i in entry_instructions(hlo_text).items()}
    tmp = tempfile.mkdtemp(prefix="sgld_bench_trace_")
    try:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                call()
        files = glob.glob(os.path.join(tmp, "**", "*perfetto_trace.json.gz"),
                          recursive=True)
        if not files:
            return None
        with gzip.open(files[0]) as f:
            data = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    events = data["traceEvents"] if isinstance(data, dict) else data
    ms: Dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in instrs:
            ms[e["name"]] = ms.get(e["name"], 0.0) + (
                e["dur"] / 1e3 / calls / steps_per_call)
    rows = sorted(((k, v, sorted(instrs[k][0]), instrs[k][1])
                   for k, v in ms.items()), key=lambda r: -r[1])
    return {"top": rows[:top], "total_ms": sum(ms.values()),
            "by_kind": _by_kind(rows),
            "kernels_with_threefry": sum("threefry" in t
                                         for t, _ in instrs.values())}


KINDS = ("scatter-add", "sketch hash",
         "reductions", "noise (Threefry bits, normal transform)",
         "other elementwise (update, temporaries)")


def _by_kind(rows) -> Dict[str, float]:
    """Milliseconds by kind of kernel; a kernel counts once, under the first
    kind in ``KINDS`` that its tags match."""
    match = (("scatter",), ("hash",), ("reduce",), ("threefry", "transform"))
    out = {k: 0.0 for k in KINDS}
    for _, v, tags, _ in rows:
        kind = next((KINDS[i] for i, m in enumerate(match)
                     if any(t in tags for t in m)), KINDS[-1])
        out[kind] += v
    return out


# --------------------------------------------------------------------------
# The end-to-end LLC problem, shared by run.py and gpu.py.

LLC_WIDTHS = (16, 64, 64, 1)
LLC_LR = 1e-3
LLC_LOCALIZATION = 100.0


def llc_num_params() -> int:
    """Parameters of the LLC benchmark's MLP."""
    return sum(a * b + b for a, b in zip(LLC_WIDTHS[:-1], LLC_WIDTHS[1:]))


def llc_problem(n, seed=0):
    """A teacher MLP's layers and ``n`` noisy regression points from it."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(LLC_WIDTHS[:-1], LLC_WIDTHS[1:]):
        layers.append({
            "w": (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
                  ).astype(np.float32),
            "b": (0.1 * rng.standard_normal(fan_out)).astype(np.float32)})
    x = rng.standard_normal((n, LLC_WIDTHS[0])).astype(np.float32)
    h = x
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = np.tanh(h)
    y = (h + 0.1 * rng.standard_normal(h.shape)).astype(np.float32)
    return layers, x, y


def mlp_loss(params, batch):
    """Mean squared error of the tanh MLP ``params`` on ``batch = (x, y)``."""
    import jax.numpy as jnp
    x, y = batch
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def torch_llc(layers, x, y, *, chains, draws, batch, nbeta, seed,
              device="cpu", sampler="sgld"):
    """The LLC benchmark's work with devinterp's optimizer in a PyTorch loop.

    One chain after another: copy the model, build the optimizer
    (``devinterp_optimizer(sampler, ...)``: ``SGLD`` or
    ``SGMCMC.rmsprop_sgld``), then per step sample a batch, backward, step.
    Everything lives on ``device``; the losses stay there until the end, so
    a GPU loop never waits per step.
    """
    import torch

    torch.manual_seed(seed)
    mods = []
    for i, layer in enumerate(layers):
        lin = torch.nn.Linear(*layer["w"].shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer["w"].T.copy()))
            lin.bias.copy_(torch.from_numpy(layer["b"]))
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*mods).to(device)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    n = xt.shape[0]
    with torch.no_grad():
        init_loss = torch.nn.functional.mse_loss(model(xt), yt).item()
    losses = torch.empty(chains, draws, device=device)
    for c in range(chains):
        m = copy.deepcopy(model)
        opt = devinterp_optimizer(sampler, list(m.parameters()), lr=LLC_LR,
                                  nbeta=nbeta, localization=LLC_LOCALIZATION)
        for t in range(draws):
            idx = torch.randint(0, n, (batch,), device=device)
            loss = torch.nn.functional.mse_loss(m(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[c, t] = loss.detach()
    per_chain = nbeta * (losses.double().mean(dim=1) - init_loss)
    return float(per_chain.mean())


def llc_inputs(layers, x, y):
    """The LLC benchmark's problem (``llc_problem``) as JAX arrays."""
    import jax.numpy as jnp

    params = [{k: jnp.asarray(v) for k, v in layer.items()}
              for layer in layers]
    return params, (jnp.asarray(x), jnp.asarray(y))


def llc_ours(params, data, chains, draws, batch, seed, sampler="sgld"):
    """One ``so.estimate_llc`` run of the LLC benchmark's problem."""
    import sgld_optax as so

    return so.estimate_llc(
        mlp_loss, params, data, key=seed, sampler=sampler,
        learning_rate=LLC_LR, nbeta=so.default_nbeta(batch),
        localization=LLC_LOCALIZATION, num_chains=chains, num_draws=draws,
        batch_size=batch, progress=False)
