r"""A native CPU kernel for the SGLD step: update, metrics and sketch in one pass.

XLA's CPU backend compiles the sampler's step as several loops: the update
(with its noise), one library reduction per sum of products behind the
metrics, and one scatter per vector sketched, each reading its inputs from
memory again. ``cpu_kernel.cc`` does the whole step of the float32 leaves
in one call, in one pass over blocks of 1024 elements that stay in the L1
cache: Threefry-2x32 and the Box-Muller transform of ``noise.py``, the update
of ``sgld.py``, the nine sums of products of the masked base vectors
(gradient :math:`g`, displacement :math:`w - w_0`, weight :math:`w`, noise
:math:`\eta`) and their count sketches, :math:`(S v)_j = \sum_{h(i) = j}
s(i) v_i` with the hash of ``sketch.py``, all four vectors added into a
bucket with one 16-byte addition. It runs on XLA's own intra-op threads,
over at most 64 ranges of the leaves laid end to end, fixed by their sizes
and the sketch's, whose partial results are added in order, so its results
do not depend on the number of threads.

The noise is bitwise equal to the XLA program's: the kernel performs the
same float32 operations in the same order and forms a multiply-add exactly
where LLVM, which generates XLA's CPU code, contracts one. The update is the
same formula, with a multiply-add wherever a product meets a sum; XLA's
choice there depends on which hyperparameters are compile-time constants
(it reassociates products of constants first), so the updates agree with
XLA's to float32 rounding, not bit for bit, and a chain run with the kernel
drifts from one run without it by rounding. The kernel's updates do not
depend on whether metrics or sketches are kept, nor on the number of
threads. The sums and sketches add the same terms in another order.

Under ``jax.vmap`` (``vmap_method="expand_dims"``) the operands arrive with
the batch dimensions in front, of size 1 where an operand is not batched,
and one call steps every chain: each chain's buffers are read in place and
unbatched ones (the initial params, a mask) are shared. A chain's ranges do
not depend on the number of chains, so its results are bitwise those of
the chain stepped alone.

The source is compiled the first time it is needed, with the system's C++
compiler (``$CXX``, else ``c++``) for the host CPU (``-march=native``, and
512-bit vectors where the CPU has AVX-512) and against the XLA FFI headers that ship with jaxlib, into a cache directory
(``$SGLD_OPTAX_CACHE``, else ``$XDG_CACHE_HOME/sgld_optax``, else
``~/.cache/sgld_optax``), keyed by the source, jaxlib's version, the
compiler's version, the flags and the host CPU they target (what the compiler
makes of ``-march=native``); later processes on the same kind of CPU load the
cached library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from sgld_optax._src.xla_options import _cpu_has_avx512

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "cpu_kernel.cc")
_TARGET = "sgld_optax_cpu_step"
_SYMBOL = "SgldOptaxCpuStep"

# Bits of the kernel's flags attribute (cpu_kernel.cc).
LOCALIZATION, WEIGHT_DECAY, BOX, MASK, SUMS, SKETCH, INITIAL = (
    1, 2, 4, 8, 16, 32, 64)
# Order of the kernel's sums of products of the masked base vectors.
SUM_PAIRS = (("g", "g"), ("d", "d"), ("e", "e"), ("g", "e"), ("g", "d"),
             ("d", "e"), ("w", "w"), ("g", "w"), ("w", "e"))
# Columns of its sketch output.
SKETCH_COLUMNS = ("g", "d", "w", "e")
# Largest sketch dimension the kernel takes: each of its ranges (16 for such
# a sketch) keeps 4 x k float32 buckets.
MAX_SKETCH_DIM = 1 << 16

_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
          "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd")
# GCC, tuned for the AVX-512 server CPUs (what -march=native gives on
# Skylake to Sapphire Rapids), vectorises for 256-bit registers unless told
# otherwise, for the lower clock some of them run at under 512-bit
# instructions (XLA does the same; see xla_options.py). The kernel's loops are
# integer and float arithmetic that the wider registers run faster: on a
# 2-core AVX-512 Xeon, one thread's pass over 4M parameters takes 7.4 ms
# with 512-bit vectors and 11.1 ms with 256-bit ones (plain step), 13.5 and
# 18.0 ms with the sketch.
_WIDE_VECTOR_FLAGS = ("-mprefer-vector-width=512",)


def _flags() -> tuple:
    """The compiler flags for this host."""
    return _FLAGS + (_WIDE_VECTOR_FLAGS if _cpu_has_avx512() else ())


class KernelUnavailable(RuntimeError):
    """The native CPU kernel could not be built or loaded."""


def _cache_dir() -> str:
    explicit = os.environ.get("SGLD_OPTAX_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sgld_optax")


def _compiler() -> list:
    return shlex.split(os.environ.get("CXX", "c++"))


def _run_compiler(cxx: list, args: list) -> str:
    """The compiler's output (stdout and stderr) for ``args``."""
    try:
        out = subprocess.run(cxx + args, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelUnavailable(
            f"the native CPU kernel needs a C++ compiler; running "
            f"{' '.join(cxx)!r} failed: {err}. Set $CXX to one.") from err
    return out.stdout + out.stderr


def _compiler_version(cxx: list) -> str:
    return _run_compiler(cxx, ["--version"])


def _target(cxx: list, flags: tuple) -> str:
    """What the compiler makes of ``flags`` on this host.

    ``-###`` prints the compiler's own command lines without running them,
    with ``-march=native`` spelled out as the host CPU's name and
    instruction set extensions (GCC: ``-march=rocketlake -mavx512f ...``;
    Clang: ``-target-cpu`` and ``-target-feature``). A library built on one
    CPU can crash with an illegal instruction on another, so this is part of
    the cache key: a cache directory shared by machines of several kinds
    (a home directory on a cluster) keeps one library per kind.
    """
    return _run_compiler(cxx, list(flags) + ["-###", "-S", "-x", "c++", "-",
                                             "-o", os.devnull])


def _library_path(cxx: list, flags: tuple) -> str:
    """Where the library built by ``cxx`` with ``flags`` is cached."""
    import jaxlib

    with open(_SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(),
        _compiler_version(cxx).encode(), " ".join(cxx + list(flags)).encode(),
        _target(cxx, flags).encode(),
    ])).hexdigest()[:20]
    return os.path.join(_cache_dir(), f"cpu_kernel-{digest}.so")


def _build() -> str:
    """Compiles cpu_kernel.cc (or finds it in the cache); returns its path."""
    cxx = _compiler()
    flags = _flags()
    include = jax.ffi.include_dir()
    path = _library_path(cxx, flags)
    directory = os.path.dirname(path)
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    cmd = cxx + list(flags) + ["-I", include, _SOURCE, "-o", tmp]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        os.unlink(tmp)
        raise KernelUnavailable(
            f"compiling the native CPU kernel failed: {err}") from err
    if out.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(
            "compiling the native CPU kernel failed:\n  "
            + " ".join(shlex.quote(c) for c in cmd) + "\n"
            + (out.stderr or out.stdout)[-4000:])
    os.replace(tmp, path)  # atomic: concurrent builders each write their own
    return path


@functools.lru_cache(maxsize=None)
def load() -> str:
    """Builds (once per cache) and registers the kernel; returns the library path.

    Raises:
      KernelUnavailable: if there is no C++ compiler, or compiling or loading
        the kernel fails (the message has the compiler's output).
    """
    path = _build()
    try:
        library = ctypes.cdll.LoadLibrary(path)
        handler = getattr(library, _SYMBOL)
    except (OSError, AttributeError) as err:
        raise KernelUnavailable(
            f"loading the native CPU kernel from {path} failed: {err}") from err
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler),
                                platform="cpu")
    return path


def step(leaves, key_words, scalars, *, flags: int, sketch_dim: int = 0,
         offsets=None, salts=(0, 0)):
    """One step of float32 leaves by the kernel, in one call.

    Call it under ``lax.platform_dependent(cpu=...)``: the kernel is
    registered for CPU only.

    Args:
      leaves: a list of ``(w, g, w0, mask)`` per leaf: float32 params and
        gradient of one shape, the initial params (with the ``INITIAL``
        flag, else ``None``) and the float32 0/1 mask (with the ``MASK``
        flag, else ``None``).
      key_words: a list of the two uint32 words of each leaf's Threefry key.
      scalars: float32 scalars ``(a_g, a_loc, a_wd, a_noise, box)``: the
        factors of the gradient, displacement, weight and noise in the
        update (0 for an absent term) and the bounding box's half-width.
      flags: OR of the flag constants of this module.
      sketch_dim: :math:`k`, with the ``SKETCH`` flag.
      offsets: index of each leaf's first element in the flattened params
        (the count sketch hashes these indices).
      salts: the two uint32 salts of the count sketch's hash.

    Returns:
      ``(updates, sums, sketch)``: a list of float32 updates shaped like
      each ``w``, the float32 ``(9,)`` sums over all leaves in
      ``SUM_PAIRS`` order, and the float32 ``(sketch_dim, 4)`` count
      sketches of the vectors in ``SKETCH_COLUMNS`` order (``(0, 4)``
      without the ``SKETCH`` flag).
    """
    args = []
    for w, g, w0, mask in leaves:
        args += [w, g]
        if flags & INITIAL:
            args.append(w0)
        if flags & MASK:
            args.append(mask)
    keys = jnp.stack([jnp.stack([jnp.asarray(a, jnp.uint32),
                                 jnp.asarray(b, jnp.uint32)])
                      for a, b in key_words])
    scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in scalars])
    width = sketch_dim if flags & SKETCH else 0
    offsets = np.zeros(len(leaves), np.int64) if offsets is None else (
        np.asarray(offsets, np.int64))
    call = jax.ffi.ffi_call(
        _TARGET,
        (jax.ShapeDtypeStruct((len(SUM_PAIRS),), jnp.float32),
         jax.ShapeDtypeStruct((width, len(SKETCH_COLUMNS)), jnp.float32),
         *(jax.ShapeDtypeStruct(w.shape, jnp.float32)
           for w, _, _, _ in leaves)),
        vmap_method="expand_dims")
    sums, sketch, *updates = call(
        keys, scalars, *args, flags=np.int64(flags),
        sketch_dim=np.int64(sketch_dim), offsets=offsets,
        ranks=np.asarray([np.ndim(w) for w, _, _, _ in leaves], np.int64),
        salt1=np.int64(salts[0]), salt2=np.int64(salts[1]))
    return updates, sums, sketch
