"""The benchmarks run: a tiny run of benchmarks/run.py, and gpu.py's fallback.

These check that the benchmark scripts work, not how fast anything is.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from sgld_testing import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parent.parent

needs_devinterp = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None
    or importlib.util.find_spec("devinterp") is None,
    reason="the benchmarks compare against devinterp (torch extra)")


def _run(args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_page_plot_and_results(tmp_path):
    docs_before = sorted((ROOT / "docs").rglob("*"))
    result = _run(["benchmarks/run.py", "--quick", "--out", str(tmp_path),
                   "--json", str(tmp_path / "results.json")])
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "benchmarks.md").read_text()
    for heading in ("### Targets", "### Optimizer step", "### The floor",
                    "### Memory", "### LLC end to end",
                    "### Where our step's time goes"):
        assert heading in page
    assert "benchmark_step_time.png" in page
    assert (tmp_path / "benchmark_step_time.png").read_bytes()[:8] == (
        b"\x89PNG\r\n\x1a\n")
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["steps"]
    for mode in ("plain", "metrics", "sketch"):
        assert row["modes"][mode]["ours_ms"] > 0
        assert row["modes"][mode]["devinterp_ms"] > 0
    assert row["floor_ms"] > 0 and row["copy_ms"] > 0
    # Where so.compiler_options() sets anything, our steps and the floor are
    # also timed compiled with it, and three more targets are judged.
    import sgld_optax as so
    wide = so.compiler_options("cpu")
    assert row["compiler_options"] == wide
    for mode in ("plain", "metrics", "sketch"):
        assert (row["modes"][mode]["ours_wide_ms"] > 0) if wide else (
            row["modes"][mode]["ours_wide_ms"] is None)
    assert (row["floor_wide_ms"] > 0) if wide else row["floor_wide_ms"] is None
    # Both keep the initial params: 4 bytes per float32 param; devinterp's
    # sketch tables add 12 more.
    assert results["memory"]["plain"]["ours"]["per_param"] == pytest.approx(4)
    assert results["memory"]["sketch"]["devinterp"]["per_param"] == (
        pytest.approx(16))
    llc = results["llc"]
    if "skipped" not in llc:
        assert llc["ours_warm_s"] > 0 and llc["devinterp_warm_s"] > 0
    # Where the native CPU kernel builds, our steps are also timed with
    # native_cpu=True, and two more targets are judged.
    assert row["native"] is True
    for mode in ("plain", "metrics", "sketch"):
        assert row["modes"][mode]["ours_native_ms"] > 0
    assert len(results["targets"]) == (14 if wide else 11) + 2
    assert sum("native_cpu=True" in t["target"]
               for t in results["targets"]) == 2
    assert "native: ours ms" in page
    if wide:
        assert "so.compiler_options()" in page
    # A --out run leaves the docs alone.
    assert sorted((ROOT / "docs").rglob("*")) == docs_before


def test_page_keeps_text_outside_the_markers(tmp_path):
    run = load_benchmark("run")
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Title\n\nintro\n\n{run.BEGIN}\nold\n{run.END}\n\n"
                    "## Notes\n\nhand-written\n")
    run.write_page(str(page), "new table")
    text = page.read_text()
    assert "intro" in text and "hand-written" in text
    assert "new table" in text and "old" not in text
    fresh = tmp_path / "fresh.md"
    run.write_page(str(fresh), "table")
    assert run.BEGIN in fresh.read_text() and "table" in fresh.read_text()


def test_overhead_rows_compare_the_work_alone_with_the_budget():
    run = load_benchmark("run")
    row = {"modes": {"plain": {"ours_ms": 10.0}, "metrics": {"ours_ms": 30.0},
                     "sketch": {"ours_ms": 40.0}}}
    prof = {"parts": {
        "metrics: the 6 reductions alone, inputs in memory": 7.0,
        "sketch: hash + scatter-add of 3 columns": 4.0}}
    # Budgets: 0.25 x 10 ms for metrics, 0.5 x 10 ms for sketches.
    why = run._why("metrics", row, None, {}, prof)
    assert "+20 ms over the plain step" in why
    assert "take 7 ms, more than the 2.5 ms the target allows" in why
    why = run._why("sketch", row, None, {}, prof)
    assert "take 4 ms, less than the 5 ms the target allows" in why
    assert "page faults" not in why
    # Measured page faults of the step's scratch are reported with it.
    row["modes"]["metrics"].update(minor_faults=8192.0,
                                   ours_temp_bytes=32 << 20)
    why = run._why("metrics", row, None, {}, prof)
    assert "its 32 MiB of XLA scratch costs 8,192 minor page faults" in why
    # Without the parts (they are best effort) the sentence is left out.
    assert "allows" not in run._why("metrics", row, None, {}, {"parts": {}})


def test_options_rows_say_whether_the_options_helped():
    # 512-bit vectors speed up the step on some CPUs and slow it on others:
    # the page says which, from the run's own times.
    run = load_benchmark("run")
    row = {"modes": {"plain": {"ours_ms": 7.0, "ours_wide_ms": 8.0},
                     "metrics": {"ours_ms": 20.0, "ours_wide_ms": 18.0},
                     "sketch": {"ours_ms": 30.0, "ours_wide_ms": 28.0}},
           "floor_wide_ms": 1.5}
    why = run._why("metrics wide", row, None, {}, None)
    assert "+10 ms over the plain step (8 ms) compiled the same way" in why
    assert "plain step is slower (8 vs 7 ms)" in why
    assert "this one faster (18 vs 20 ms)" in why
    why = run._why("floor wide", row, None, {}, None)
    assert why.startswith("plain step 8 ms vs 1.5 ms without noise")
    assert "slower (8 vs 7 ms)" in why


@pytest.mark.skipif(sys.platform != "linux",
                    reason="counts pages the Linux kernel maps afresh")
def test_page_faults_are_counted_per_step():
    import mmap
    bl = load_benchmark("bench_lib")
    pages = 4096

    def fresh_pages():  # two steps, each touching every page of a new map
        for _ in range(2):
            with mmap.mmap(-1, pages * mmap.PAGESIZE) as block:
                for i in range(pages):
                    block[i * mmap.PAGESIZE] = 1

    assert bl.minor_faults_per_step(fresh_pages, steps_per_call=2) >= pages
    kept = mmap.mmap(-1, pages * mmap.PAGESIZE)

    def same_pages():
        for i in range(pages):
            kept[i * mmap.PAGESIZE] = 2

    assert bl.minor_faults_per_step(same_pages) < 0.01 * pages
    kept.close()


def test_sizes_and_shapes():
    bl = load_benchmark("bench_lib")
    assert bl.parse_size("4M") == 4 << 20
    assert bl.parse_size("64K") == 65536
    assert bl.parse_size("20000") == 20000
    with pytest.raises(ValueError):
        bl.parse_size("lots")
    params, _ = bl.make_arrays(4 << 20)
    n = bl.num_params(params)
    assert abs(n - (4 << 20)) / (4 << 20) < 0.01
    assert params["attn_qkv"].shape == (512, 1536)


def test_gpu_script_says_why_without_a_gpu():
    has_gpu = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('gpu')"],
        capture_output=True).returncode == 0
    if has_gpu:
        pytest.skip("a GPU is present")
    result = _run(["benchmarks/gpu.py", "--sizes", "4K"], timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


@needs_devinterp
def test_gpu_script_runs_on_cpu_when_allowed(tmp_path):
    gpu = load_benchmark("gpu")
    out = tmp_path / "gpu.md"
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\nbefore\n\n{gpu.BEGIN}\nstale tables\n"
                    f"{gpu.END}\n\nafter\n")
    result = _run(["benchmarks/gpu.py", "--allow-cpu", "--sizes", "4K",
                   "--modes", "plain,sketch", "--repeats", "1", "--inner", "2",
                   "--llc-repeats", "1", "--llc-draws", "5", "--out", str(out),
                   "--page", str(page)], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    # The page's block is replaced by the same tables; the text around it
    # stays.
    written = page.read_text()
    assert written.startswith("# Page\n\nbefore\n\n" + gpu.BEGIN)
    assert written.endswith(gpu.END + "\n\nafter\n")
    assert "stale tables" not in written and text.strip() in written
    assert "| plain |" in text and "copy of the params" in text
    sketch = next(line for line in text.splitlines() if "| sketch |" in line)
    cells = [c.strip() for c in sketch.strip("|").split("|")]
    # devinterp ms, ours ms, ratio, overhead over our plain step, kernels.
    assert all(float(c) > 0 for c in cells[2:7]), cells
    assert "LLC end to end" in text
    assert any(line.startswith("| warm |") for line in text.splitlines())


@pytest.mark.parametrize("hlo, kernels", [
    ("HloModule m\n\n%fused (p: f32[4]) -> f32[4] {\n  a = f32[4] add(p, p)\n}"
     "\n\nENTRY %main.8 (p0: f32[4]) -> (f32[4]) {\n"
     "  p0 = f32[4]{0} parameter(0)\n"
     "  f = f32[4]{0} fusion(p0), kind=kLoop, calls=fused\n"
     "  s = f32[8]{0} scatter(f, i, u), to_apply=add\n"
     "  t = (f32[4]{0}) tuple(f)\n}\n", 2),
    ("no module here", None),
])
def test_gpu_script_counts_the_entry_kernels(hlo, kernels):
    gpu = load_benchmark("gpu")
    assert gpu.entry_kernels(hlo) == kernels


def test_cold_llc_with_a_persistent_compilation_cache():
    # Two fresh processes share a cache folder: the second one finds the
    # sampling program compiled and returns its cold time.
    run = load_benchmark("run")
    seconds, entries = run.llc_cold_with_cache(n=256, chains=2, draws=5,
                                               batch=32)
    assert seconds > 0.0
    assert entries >= 1  # the sampling program was written to the cache
