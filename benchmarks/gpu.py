"""The benchmark on a CUDA GPU: sgld_optax and devinterp, and bandwidth.

    python benchmarks/gpu.py                       # 1M, 4M, 16M, 64M params
    python benchmarks/gpu.py --sizes 4M,64M --out gpu_results.md

Needs JAX with CUDA (``pip install -U "jax[cuda12]"``); PyTorch with CUDA
adds devinterp's columns. Each timed call takes ``--inner`` steps back to back
and waits once at the end, so launch latency is spread over them; the
table reports the median time per step, the step's time over our plain
step's, and how many kernels the compiled step launches.

Bandwidth: a step must read the params, the gradients and the initial params
and write the params, 16 bytes per float32 parameter; *achieved GB/s* is that
over the step time. The device's copy bandwidth is measured on the same
device by copying the params' bytes into a donated buffer (8 bytes per
parameter moved), and *of copy* is the ratio of the two.

Then the LLC part of ``run.py``: ``so.estimate_llc`` on the GPU against
devinterp's ``SGLD`` in a PyTorch loop on the GPU, cold and warm
(``--llc-repeats 0`` skips it). Without a GPU the script says so and exits
with status 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from typing import Optional

# Let JAX and PyTorch share the GPU's memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as bl  # noqa: E402

NO_GPU = 2


def _gpu_device():
    """JAX's first GPU device, or ``(None, reason)``."""
    try:
        import jax
    except ImportError as err:
        return None, f"JAX is not installed ({err})"
    try:
        devices = jax.devices("gpu")
    except RuntimeError as err:
        return None, (f"JAX sees no GPU ({str(err).splitlines()[0]}); "
                      f"its backend is {jax.default_backend()!r}")
    if not devices:
        return None, "JAX sees no GPU"
    return devices[0], None


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    try:
        import devinterp.optim.sgld  # noqa: F401
    except ImportError:
        return False, "devinterp is not installed"
    if not torch.cuda.is_available():
        return False, "PyTorch has no CUDA device"
    return True, None


def bench_llc(repeats, draws, use_torch, torch_device, chains=8, batch=64,
              n=4096):
    """The LLC part of ``run.py`` on this device: cold and warm seconds.

    ``so.estimate_llc`` runs on JAX's default device (the GPU); devinterp's
    ``SGLD`` runs in a PyTorch loop on ``torch_device``. Cold is each one's
    first call in this process; warm the median of ``repeats`` later calls.
    """
    import time

    import numpy as np
    import sgld_optax as so

    layers, x, y = bl.llc_problem(n)
    params, data = bl.llc_inputs(layers, x, y)
    nbeta = so.default_nbeta(batch)
    runs = {"ours": lambda seed: float(bl.llc_ours(
        params, data, chains, draws, batch, seed).llc_mean)}
    if use_torch:
        runs["devinterp"] = lambda seed: bl.torch_llc(
            layers, x, y, chains=chains, draws=draws, batch=batch,
            nbeta=nbeta, seed=seed, device=torch_device)
    out = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        est = bl.run_quietly(fn, 0)
        cold = time.perf_counter() - t0
        warm = []
        for seed in range(1, repeats + 1):
            t0 = time.perf_counter()
            bl.run_quietly(fn, seed)
            warm.append(time.perf_counter() - t0)
        out[name] = {"cold_s": cold, "warm_s": float(np.median(warm)),
                     "llc": est}
        bl.log(f"[llc] {name}: cold {cold:.2f} s, warm "
               f"{out[name]['warm_s']:.3f} s, llc {est:.2f}")
    return out


def _llc_lines(llc, chains, draws):
    header = ["LLC run", "devinterp s", "ours s", "devinterp / ours",
              "estimate (devinterp, ours)"]
    rows = []
    theirs = llc.get("devinterp")
    ours = llc["ours"]
    for kind in ("cold", "warm"):
        t = ours[f"{kind}_s"]
        d = theirs[f"{kind}_s"] if theirs else None
        rows.append([kind, "" if d is None else f"{d:.3f}", f"{t:.3f}",
                     "" if d is None else f"{d / t:.1f}x",
                     (f"{theirs['llc']:.2f}, " if theirs else "")
                     + f"{ours['llc']:.2f}"])
    return ["", f"LLC end to end: MLP {'-'.join(map(str, bl.LLC_WIDTHS))} "
            f"(tanh), 4096 points, batch 64, {chains} chains x {draws} "
            "draws; cold is the first call (compilation included), warm the "
            "median of later ones.", "", *_table(header, rows)]


_NOT_KERNELS = {"parameter", "tuple", "get-tuple-element", "bitcast",
                "constant", "after-all", "opt-barrier"}


def entry_kernels(hlo: str) -> Optional[int]:
    """How many kernels the compiled step's entry computation launches.

    Counts the instructions of the ``ENTRY`` computation of XLA's optimized
    HLO that do work on the device (fusions, custom calls, copies, ...),
    leaving out parameters, tuples and bitcasts. ``None`` without HLO text.
    """
    lines = hlo.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("ENTRY")),
                 None)
    if start is None:
        return None
    count = 0
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        m = re.search(r"= \S+ ([a-z][a-z0-9-]*)\(", line)
        if m and m.group(1) not in _NOT_KERNELS:
            count += 1
    return count


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,4M,16M,64M",
                   help="comma-separated parameter counts (default %(default)s)")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed calls per benchmark (default %(default)s)")
    p.add_argument("--inner", type=int, default=20,
                   help="steps per timed call (default %(default)s)")
    p.add_argument("--modes", default=",".join(bl.MODES),
                   help="which steps to time (default %(default)s)")
    p.add_argument("--no-torch", action="store_true",
                   help="time sgld_optax only")
    p.add_argument("--llc-repeats", type=int, default=5,
                   help="warm LLC runs per library; 0 skips the LLC part "
                   "(default %(default)s)")
    p.add_argument("--llc-draws", type=int, default=500,
                   help="draws per chain in the LLC part (default %(default)s)")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run on the CPU instead (a check of "
                   "the script; the numbers say nothing about GPUs)")
    args = p.parse_args(argv)

    device, why = _gpu_device()
    torch_device = "cuda"
    if device is None and args.allow_cpu:
        import jax
        bl.log(f"[gpu] no GPU ({why}): running on the CPU (--allow-cpu)")
        device, torch_device = jax.devices("cpu")[0], "cpu"
    if device is None:
        print(f"benchmarks/gpu.py needs a CUDA GPU: {why}. Install "
              '`jax[cuda12]` (and a CUDA build of PyTorch for devinterp\'s '
              "columns) and run it on a CUDA machine; the CPU benchmark is "
              "`python benchmarks/run.py`.", file=sys.stderr)
        return NO_GPU
    use_torch, torch_why = (False, "--no-torch") if args.no_torch else (
        _torch_cuda() if torch_device == "cuda" else (True, None))
    if not use_torch:
        bl.log(f"[gpu] devinterp columns skipped: {torch_why}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in bl.MODES:
            p.error(f"unknown mode {m!r}; choose from {bl.MODES}")
    sizes = sorted({bl.parse_size(s) for s in args.sizes.split(",")})
    inner = max(1, args.inner)

    env = bl.environment()
    if use_torch and torch_device == "cuda":
        import torch
        env["torch device"] = torch.cuda.get_device_name(0)
    env["jax device"] = f"{device.device_kind} ({device})"
    bl.log("[env] " + "; ".join(f"{k}: {v}" for k, v in env.items()))

    rows = []
    for n_req in sizes:
        params, grads = bl.make_arrays(n_req)
        n = bl.num_params(params)
        label = bl.size_label(n_req)
        bl.log(f"[floor] {label}: fused update without noise, and a copy")
        upd, cpy = bl.run_quietly(bl.floor_steps, params, grads, device,
                                  inner)
        t = bl.run_quietly(bl.interleaved, {"update": upd, "copy": cpy},
                           args.repeats)
        floor_ms = bl.median_ms(t["update"]) / inner
        copy_ms = bl.median_ms(t["copy"]) / inner
        copy_gbps = 8 * n / (copy_ms * 1e-3) / 1e9
        del upd, cpy
        rows.append([f"{label} ({n:,})", "floor: update, no noise", "",
                     f"{floor_ms:.3f}", "", "", "",
                     f"{16 * n / (floor_ms * 1e-3) / 1e9:.3g}",
                     f"{16 * n / (floor_ms * 1e-3) / 1e9 / copy_gbps:.0%}"])
        rows.append([f"{label} ({n:,})", "copy of the params", "",
                     f"{copy_ms:.3f}", "", "", "", f"{copy_gbps:.3g}",
                     "100%"])
        plain_ms = None
        for mode in modes:
            bl.log(f"[step] {label} ({n:,} params) {mode}")
            fns = {}
            ours = bl.run_quietly(bl.ours_step, mode, params, grads, device,
                                  inner)
            fns["ours"] = ours.call
            kernels = entry_kernels(ours.hlo_text)
            if use_torch:
                theirs = bl.run_quietly(bl.devinterp_step, mode, params,
                                        grads, torch_device, inner)
                fns["devinterp"] = theirs.call
            t = bl.run_quietly(bl.interleaved, fns, args.repeats)
            ours_ms = bl.median_ms(t["ours"]) / inner
            theirs_ms = (bl.median_ms(t["devinterp"]) / inner
                         if use_torch else None)
            gbps = 16 * n / (ours_ms * 1e-3) / 1e9
            rows.append([
                f"{label} ({n:,})", mode,
                "" if theirs_ms is None else f"{theirs_ms:.3f}",
                f"{ours_ms:.3f}",
                "" if theirs_ms is None else f"{ours_ms / theirs_ms:.2f}",
                "" if plain_ms is None else f"{ours_ms / plain_ms:.2f}",
                "" if kernels is None else str(kernels),
                f"{gbps:.3g}", f"{gbps / copy_gbps:.0%}"])
            if mode == "plain":
                plain_ms = ours_ms
            del ours, fns
            gc.collect()
        del params, grads
        gc.collect()

    llc = None
    if args.llc_repeats > 0:
        bl.log(f"[llc] 8 chains x {args.llc_draws} draws, "
               f"{args.llc_repeats} warm runs each")
        llc = bench_llc(args.llc_repeats, args.llc_draws, use_torch,
                        torch_device)

    header = ["params", "step", "devinterp ms", "ours ms", "ours / devinterp",
              "ours / our plain", "kernels", "achieved GB/s", "of copy"]
    lines = _table(header, rows)
    if llc is not None:
        lines += _llc_lines(llc, 8, args.llc_draws)
    text = "\n".join(
        [f"GPU step benchmark: {env['jax device']}; "
         + ", ".join(f"{k} {env[k]}" for k in ("sgld_optax", "jax", "jaxlib",
                                               "torch", "devinterp")),
         f"Median of {args.repeats} calls of {inner} steps each.", ""] + lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
