"""XLA compiler options under which the sampler's step runs faster.

The SGLD step's cost on CPU is its noise: 20 rounds of Threefry-2x32 and a
Box-Muller transform per parameter, all 32-bit integer and float arithmetic in
one elementwise loop (see ``noise.py``). XLA's CPU backend compiles such loops
for 256-bit vectors even on CPUs with 512-bit AVX-512 units, to avoid the
lower clock some of those CPUs run at under 512-bit instructions. For this
loop the wider vectors can win: on one 2-core AVX-512 Xeon the 4M-parameter
plain step took about 0.7x as long, though on another it took 1.06x to 1.12x
as long (see the benchmarks page). Which it is depends on the CPU.

The setting is a per-program compiler option, so it can be passed to the one
``jax.jit`` that compiles the step without touching the rest of the process
(unlike the ``XLA_FLAGS`` environment variable). It changes how XLA vectorises
elementwise loops, not what they compute: the sampler's steps are bitwise
equal with and without it (tested).
"""

from __future__ import annotations

import functools
import platform

import jax
import jax.numpy as jnp

_WIDE_VECTORS = {"xla_cpu_prefer_vector_width": 512}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The feature flags an x86-64 host's CPU reports in /proc/cpuinfo
    (``avx2``, ``avx512f``, ...); empty elsewhere or where it can't be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_has_avx512() -> bool:
    """Whether this host's CPU reports AVX-512F (read from /proc/cpuinfo)."""
    return "avx512f" in _cpu_flags()


@functools.lru_cache(maxsize=None)
def _accepted(platform_name: str, options: tuple) -> bool:
    """Whether this jaxlib's compiler for ``platform_name`` accepts ``options``."""
    device = jax.devices(platform_name)[0]
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
            jax.device_put(jnp.zeros((), jnp.float32), device)).compile()
    except Exception:  # an unknown option: compiling with it would fail
        return False
    return True


def compiler_options(backend: str | None = None) -> dict:
    """XLA compiler options that can make the sampler's step faster on ``backend``.

    Pass them to the ``jax.jit`` that compiles your training or sampling step::

      step = jax.jit(step, compiler_options=so.compiler_options())

    On a CPU with AVX-512 (x86-64, Linux) this is
    ``{"xla_cpu_prefer_vector_width": 512}``: XLA then vectorises the step's
    elementwise loop, where the Threefry rounds and the normal transform run,
    for 512-bit instead of 256-bit registers. On other backends and CPUs, and
    with a jaxlib that does not know the option, it is ``{}``, which
    ``jax.jit`` treats as no options. The option changes only the speed: the
    step's results are bitwise equal with and without it. Whether the speed
    gets better depends on the CPU (0.7x the step's time on one AVX-512 Xeon,
    1.06x to 1.12x on another), so time your step both ways.

    Args:
      backend: the platform the step will run on (``"cpu"``, ``"gpu"``,
        ``"tpu"``); defaults to ``jax.default_backend()``.

    Returns:
      A new dict of compiler options (possibly empty).
    """
    platform_name = backend if backend is not None else jax.default_backend()
    if platform_name != "cpu" or not _cpu_has_avx512():
        return {}
    options = tuple(sorted(_WIDE_VECTORS.items()))
    if not _accepted(platform_name, options):
        return {}
    return dict(options)
