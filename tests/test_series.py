"""Tests for the LLC over a checkpoint series (`_src/llc/series.py`)."""

import gc
import os
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgld_optax as so
from sgld_optax import torch_interop
from sgld_optax._src.llc import series as series_lib

# The fake training run's early checkpoints are not minima of the loss, and
# their estimates are flagged as untrustworthy: that is not under test here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The LLC estimate .* is not to be trusted:RuntimeWarning")

KWARGS = dict(learning_rate=1e-4, nbeta=20.0, localization=10.0,
              num_chains=2, num_draws=40, num_burnin_steps=3, batch_size=32,
              key=3)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(192, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 2)) + 0.1 * rng.normal(size=(192, 2))
         ).astype(np.float32)
    return x, y


def _loss(params, batch):
    x, y = batch
    h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    return jnp.mean((h - y) ** 2)


def _checkpoints(count, seed=1):
    """A fake training run: params moving towards the least squares fit."""
    rng = np.random.default_rng(seed)
    end = rng.normal(size=(3, 2)).astype(np.float32)
    return [{"Dense_0": {"kernel": jnp.asarray(end * (k + 1) / count),
                         "bias": jnp.full((2,), 0.1 * k, jnp.float32)}}
            for k in range(count)]


def test_each_checkpoint_is_the_single_estimate_with_the_same_key():
    """Grouped and padded (5 checkpoints in groups of 2), every checkpoint's
    chains are those estimate_llc samples there."""
    data = _problem()
    cks = _checkpoints(5)
    series = so.estimate_llc_series(_loss, cks, data, group_size=2,
                                    steps=[10, 20, 30, 40, 50], **KWARGS)
    np.testing.assert_array_equal(series.steps, [10, 20, 30, 40, 50])
    for ck, result in zip(cks, series.results):
        single = so.estimate_llc(_loss, ck, data, progress=False, **KWARGS)
        np.testing.assert_allclose(result.loss_trace, single.loss_trace,
                                   rtol=2e-5, atol=1e-7)
        assert result.init_loss == pytest.approx(single.init_loss, rel=1e-6)
    np.testing.assert_allclose(
        series.llc_mean, [r.llc_mean for r in series.results])
    np.testing.assert_allclose(
        series.init_loss, [r.init_loss for r in series.results])


def test_one_program_per_group_size():
    data = _problem(seed=2)
    cks = _checkpoints(5, seed=3)
    kwargs = dict(KWARGS, num_draws=37)  # a program no other test compiles
    before = series_lib._series._cache_size()
    so.estimate_llc_series(_loss, cks, data, group_size=2, **kwargs)
    assert series_lib._series._cache_size() == before + 1
    so.estimate_llc_series(_loss, cks[::-1], data, group_size=2, **kwargs)
    assert series_lib._series._cache_size() == before + 1


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_files(tmp_path, suffix):
    """Files are read with params_from_torch(like=...); the estimates are
    those of the pytrees they hold."""
    pytest.importorskip("torch")
    data = _problem(seed=4)
    cks = _checkpoints(3, seed=5)
    paths = []
    for k, ck in enumerate(cks):
        paths.append(torch_interop.save_torch_checkpoint(
            ck, tmp_path / f"step{k}{suffix}"))
    from_files = so.estimate_llc_series(_loss, paths, data, like=cks[0],
                                        **KWARGS)
    from_trees = so.estimate_llc_series(_loss, cks, data, **KWARGS)
    np.testing.assert_array_equal(from_files.llc_mean, from_trees.llc_mean)


def _loader(x, y):
    """A loader class over the first 192 rows of `(x, y)`, in batches of 32."""

    class Loader:
        def __iter__(self):
            return iter([(x[i:i + 32], y[i:i + 32])
                         for i in range(0, 192, 32)])

    return Loader


def test_a_loader_runs_the_checkpoints_one_after_another():
    Loader = _loader(*_problem(seed=6))
    cks = _checkpoints(2, seed=7)
    kwargs = {k: v for k, v in KWARGS.items() if k != "batch_size"}
    series = so.estimate_llc_series(_loss, cks, Loader(), **kwargs)
    for ck, result in zip(cks, series.results):
        single = so.estimate_llc(_loss, ck, Loader(), progress=False,
                                 **kwargs)
        np.testing.assert_allclose(result.loss_trace, single.loss_trace,
                                   rtol=1e-6)


def test_plot(tmp_path):
    data = _problem(seed=8)
    series = so.estimate_llc_series(_loss, _checkpoints(3, seed=9), data,
                                    **KWARGS)
    fig = series.plot(tmp_path / "series.png")
    assert (tmp_path / "series.png").stat().st_size > 0
    assert fig.axes[1].get_xlabel() == "training step"


def test_bad_arguments(tmp_path):
    data = _problem()
    cks = _checkpoints(2)
    with pytest.raises(ValueError, match="steps"):
        so.estimate_llc_series(_loss, cks, data, steps=[1, 2, 3], **KWARGS)
    other = {"Dense_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
    with pytest.raises(ValueError, match=r"checkpoints\[1\]"):
        so.estimate_llc_series(_loss, [cks[0], other], data, **KWARGS)
    with pytest.raises(ValueError, match="num_chains"):
        so.estimate_llc_series(_loss, cks, data, **dict(KWARGS, num_chains=0))
    with pytest.raises(ValueError, match="not an orbax checkpoint"):
        so.estimate_llc_series(_loss, [tmp_path], data, like=cks[0],
                               **KWARGS)
    (tmp_path / "a.pt").write_bytes(b"")
    with pytest.raises(TypeError, match=r"checkpoints\[0\] .*a\.pt.* like="):
        so.estimate_llc_series(_loss, [tmp_path / "a.pt"], data, **KWARGS)
    with pytest.raises(TypeError, match="non-empty list"):
        so.estimate_llc_series(_loss, [], data, **KWARGS)
    with pytest.raises(ValueError, match="group_size"):
        so.estimate_llc_series(_loss, cks, data, group_size=0, **KWARGS)


def test_paths_are_checked_before_anything_is_sampled(tmp_path,
                                                      monkeypatch):
    data = _problem()
    cks = _checkpoints(2)
    runs = []
    original = series_lib._series
    monkeypatch.setattr(series_lib, "_series",
                        lambda *a, **k: runs.append(1) or original(*a, **k))
    (tmp_path / "c.safetensors").write_bytes(b"")
    for checkpoints, error, match in (
            ([*cks, tmp_path / "missing.pt"], FileNotFoundError,
             r"checkpoints\[2\] .*missing\.pt.* does not exist"),
            ([*cks, tmp_path / "c.safetensors"], TypeError,
             r"checkpoints\[2\] .*c\.safetensors.* is a file.*like=")):
        with pytest.raises(error, match=match):
            so.estimate_llc_series(_loss, checkpoints, data, group_size=1,
                                   **KWARGS)
    assert runs == []


def _save_orbax(saver, cks, root):
    """Saves each checkpoint with orbax; returns the directories to read."""
    import orbax.checkpoint as ocp
    if saver == "manager":
        with ocp.CheckpointManager(root) as manager:
            for k, ck in enumerate(cks):
                manager.save(k, args=ocp.args.StandardSave(ck))
        return [root / str(k) for k in range(len(cks))]
    make = {"standard": ocp.StandardCheckpointer,
            "pytree": ocp.PyTreeCheckpointer}[saver]
    paths = [root / f"step{k}" for k in range(len(cks))]
    for path, ck in zip(paths, cks):
        with make() as checkpointer:
            checkpointer.save(path, ck)
    return paths


@pytest.mark.parametrize("saver", ["standard", "pytree", "manager"])
def test_orbax_directories(tmp_path, saver):
    """Orbax directories, with or without like=, give bitwise the estimates
    of the pytrees they hold."""
    data = _problem(seed=10)
    cks = _checkpoints(3, seed=11)
    paths = _save_orbax(saver, cks, tmp_path / saver)
    from_trees = so.estimate_llc_series(_loss, cks, data, **KWARGS)
    for like in (None, cks[0]):
        from_dirs = so.estimate_llc_series(_loss, paths, data, like=like,
                                           **KWARGS)
        np.testing.assert_array_equal(from_dirs.llc_mean,
                                      from_trees.llc_mean)
        for a, b in zip(from_dirs.results, from_trees.results):
            np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


def test_orbax_directory_restores_like_dtypes(tmp_path):
    """With like=, the saved arrays take like's structure and dtypes;
    without, the saved ones."""
    ck = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
          "b": (jnp.ones(2, jnp.float32),)}
    (path,) = _save_orbax("standard", [ck], tmp_path)
    like = {"w": np.zeros((2, 3), np.float16), "b": (jnp.zeros(2),)}
    restored = series_lib._load(path, like, None)
    assert restored["w"].dtype == jnp.float16
    assert isinstance(restored["b"], tuple)
    np.testing.assert_array_equal(restored["w"], np.arange(6).reshape(2, 3))
    as_saved = series_lib._load(path, None, None)
    assert as_saved["w"].dtype == jnp.float32
    np.testing.assert_array_equal(as_saved["b"][0], ck["b"][0])


def test_orbax_directory_that_does_not_match_like(tmp_path):
    data = _problem()
    cks = _checkpoints(2)
    paths = _save_orbax("standard", cks, tmp_path)
    wide = {"Dense_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
    with pytest.raises(ValueError, match=(
            r"step0.*does not match like=.*\['Dense_0'\]\['bias'\] has "
            r"shape \(2,\) saved and \(3,\)")):
        so.estimate_llc_series(_loss, paths, data, like=wide, **KWARGS)
    more = {"Dense_0": cks[0]["Dense_0"], "Dense_1": {"kernel": jnp.ones(2)}}
    with pytest.raises(ValueError, match=(
            r"in like but not saved: \['Dense_1'\]\['kernel'\]")):
        so.estimate_llc_series(_loss, paths, data, like=more, **KWARGS)


def test_directory_that_is_not_an_orbax_checkpoint(tmp_path):
    data = _problem()
    cks = _checkpoints(2)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"plain.* is a directory but not "
                       r"an orbax checkpoint: expected .*_METADATA"):
        so.estimate_llc_series(_loss, [plain], data, **KWARGS)
    # A manager's root holds steps, not items: a step must be chosen.
    _save_orbax("manager", cks, tmp_path / "run")
    with pytest.raises(ValueError, match="not an orbax checkpoint"):
        so.estimate_llc_series(_loss, [tmp_path / "run"], data, **KWARGS)
    # A step with two items is ambiguous.
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(tmp_path / "two") as manager:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(cks[0]),
            ema=ocp.args.StandardSave(cks[1])))
    with pytest.raises(ValueError, match="holds 2: ema, params"):
        so.estimate_llc_series(_loss, [tmp_path / "two" / "0"], data,
                               **KWARGS)


def _record(monkeypatch, events):
    """Records, in `events`, each checkpoint file loaded and each run (of a
    group, or of estimate_llc with a loader): its number of checkpoints and
    the files whose loaded params are still alive then."""
    real_load, real_series = series_lib._load, series_lib._series
    real_estimate = series_lib.api.estimate_llc
    loaded = []

    def alive():
        gc.collect()
        return [name for name, refs in loaded
                if any(r() is not None for r in refs)]

    def load(checkpoint, like, rules):
        params = real_load(checkpoint, like, rules)
        if not isinstance(checkpoint, (str, os.PathLike)):
            return params  # a pytree, used as it is
        name = os.path.basename(checkpoint)
        loaded.append((name, [weakref.ref(x)
                              for x in jax.tree_util.tree_leaves(params)]))
        events.append(("load", name))
        return params

    def series(*args, **kwargs):
        size = jax.tree_util.tree_leaves(args[3])[0].shape[0]
        events.append(("run", size, alive()))
        return real_series(*args, **kwargs)

    def estimate(*args, **kwargs):
        events.append(("run", 1, alive()))
        return real_estimate(*args, **kwargs)

    monkeypatch.setattr(series_lib, "_load", load)
    monkeypatch.setattr(series_lib, "_series", series)
    monkeypatch.setattr(series_lib.api, "estimate_llc", estimate)
    return alive


@pytest.mark.parametrize("group_size, expected", [
    (1, [("load", "step0"), ("run", 1, ["step0"]),
         ("load", "step1"), ("run", 1, ["step1"]),
         ("load", "step2"), ("run", 1, ["step2"])]),
    # The last group is padded to the group size.
    (2, [("load", "step0"), ("load", "step1"), ("run", 2, ["step0", "step1"]),
         ("load", "step2"), ("run", 2, ["step2"])]),
])
def test_checkpoint_files_are_loaded_per_group_and_released(
        tmp_path, monkeypatch, group_size, expected):
    """Each group's files are loaded right before it runs, and no params of
    a finished group are alive when the next one runs, nor at the end."""
    data = _problem(seed=12)
    cks = _checkpoints(3, seed=13)
    paths = _save_orbax("standard", cks, tmp_path)
    from_trees = so.estimate_llc_series(_loss, cks, data,
                                        group_size=group_size, **KWARGS)
    events = []
    alive = _record(monkeypatch, events)
    from_files = so.estimate_llc_series(_loss, paths, data, like=cks[0],
                                        group_size=group_size, **KWARGS)
    assert events == expected
    assert alive() == []
    np.testing.assert_array_equal(from_files.llc_mean, from_trees.llc_mean)


def test_a_loader_loads_one_checkpoint_at_a_time(tmp_path, monkeypatch):
    Loader = _loader(*_problem(seed=14))
    cks = _checkpoints(3, seed=15)
    paths = _save_orbax("standard", cks, tmp_path)
    kwargs = {k: v for k, v in KWARGS.items() if k != "batch_size"}
    events = []
    alive = _record(monkeypatch, events)
    series = so.estimate_llc_series(_loss, paths, Loader(), group_size=3,
                                    **kwargs)
    assert events == [("load", "step0"), ("run", 1, ["step0"]),
                      ("load", "step1"), ("run", 1, ["step1"]),
                      ("load", "step2"), ("run", 1, ["step2"])]
    assert alive() == []
    assert series.llc_mean.shape == (3,)


# One checkpoint's params: a 3 x 2 kernel and a bias of 2, float32: 32
# bytes, 64 for KWARGS's 2 chains.
@pytest.mark.parametrize("budget, sizes", [
    (1, [1, 1, 1]), (64, [1, 1, 1]), (128, [2, 2]), (191, [2, 2]),
    (None, [3])])
def test_the_default_group_size_follows_the_memory_budget(
        monkeypatch, budget, sizes):
    """The default group size keeps num_chains * group_size copies of the
    params within the budget (at least 1, at most all checkpoints); every
    checkpoint's chains stay those estimate_llc samples there."""
    if budget is not None:
        monkeypatch.setattr(series_lib, "GROUP_MEMORY_BUDGET", budget)
    data = _problem()
    cks = _checkpoints(3)
    events = []
    _record(monkeypatch, events)
    series = so.estimate_llc_series(_loss, cks, data, **KWARGS)
    assert [e[1] for e in events if e[0] == "run"] == sizes
    for ck, result in zip(cks, series.results):
        single = so.estimate_llc(_loss, ck, data, progress=False, **KWARGS)
        np.testing.assert_allclose(result.loss_trace, single.loss_trace,
                                   rtol=2e-5, atol=1e-7)


def test_a_mismatch_names_the_leaves_and_their_shapes(tmp_path):
    data = _problem()
    cks = _checkpoints(2)
    wide = {"Dense_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
    with pytest.raises(ValueError, match=re.escape(
            "checkpoints[1] differs from checkpoints[0] in shapes or dtypes "
            "(['Dense_0']['bias'] is float32[3] there and float32[2] in "
            "checkpoints[0]; ['Dense_0']['kernel'] is float32[3,3] there and "
            "float32[3,2] in checkpoints[0])")):
        so.estimate_llc_series(_loss, [cks[0], wide], data, **KWARGS)
    half = {"Dense_0": {"kernel": cks[1]["Dense_0"]["kernel"],
                        "bias": np.ones(2, np.float16)}}
    with pytest.raises(ValueError, match=re.escape(
            "['Dense_0']['bias'] is float16[2] there and float32[2]")):
        so.estimate_llc_series(_loss, [cks[0], half], data, **KWARGS)
    more = {"Dense_0": cks[1]["Dense_0"], "Dense_1": {"kernel": jnp.ones(2)}}
    with pytest.raises(ValueError, match=re.escape(
            "checkpoints[1] differs from checkpoints[0] in structure "
            "(leaves only in checkpoints[1]: ['Dense_1']['kernel'])")):
        so.estimate_llc_series(_loss, [cks[0], more], data, **KWARGS)
    with pytest.raises(ValueError, match=re.escape(
            "(leaves only in checkpoints[0]: ['Dense_1']['kernel'])")):
        so.estimate_llc_series(_loss, [more, cks[0]], data, **KWARGS)
    # A file is checked when it is loaded, and named.
    paths = _save_orbax("standard", [cks[0], cks[1], wide], tmp_path)
    with pytest.raises(ValueError, match=r"checkpoints\[2\] \('.*step2'\) "
                       r"differs .*\['Dense_0'\]\['bias'\] is float32\[3\]"):
        so.estimate_llc_series(_loss, paths, data, group_size=1, **KWARGS)


def test_diagnostics_and_table():
    data = _problem(seed=16)
    cks = _checkpoints(3, seed=17)
    series = so.estimate_llc_series(_loss, cks, data, steps=[5, 50, 500],
                                    **KWARGS)
    for name in ("rhat", "ess_bulk", "ess_tail"):
        values = getattr(series, name)
        assert values.dtype == np.float64 and values.shape == (3,)
        np.testing.assert_array_equal(
            values, [getattr(r, name) for r in series.results])
    lines = series.table().splitlines()
    assert len(lines) == 2 + 3
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["step", "llc", "std", "mcse", "rhat", "ess_bulk",
                    "L_n(w*)", "failed", "verdict"]
    assert set(lines[1]) == {"|", "-", ":"}
    for step, line, result in zip([5, 50, 500], lines[2:], series.results):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(head)
        assert float(cells[0]) == step
        assert float(cells[1]) == pytest.approx(result.llc_mean, rel=1e-3)
        assert float(cells[4]) == pytest.approx(result.rhat, abs=1e-3)
        assert float(cells[5]) == pytest.approx(result.ess_bulk, abs=0.05)
        assert float(cells[6]) == pytest.approx(result.init_loss, rel=1e-3)
        assert int(cells[7]) == int(result.diverged.sum())
        assert cells[8] == ("pass" if result.trustworthy else "fail")


def test_an_orbax_without_the_needed_parts_is_named(monkeypatch, tmp_path):
    import orbax.checkpoint as ocp
    (path,) = _save_orbax("standard", _checkpoints(1), tmp_path)
    monkeypatch.delattr(ocp.tree, "to_flat_dict")
    with pytest.raises(ImportError, match="needs a newer orbax-checkpoint"):
        series_lib._load(path, None, None)


def test_a_directory_holding_more_than_the_params_says_so(tmp_path):
    import orbax.checkpoint as ocp
    (ck,) = _checkpoints(1)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", {"params": ck,
                                               "ema": jax.tree.map(
                                                   lambda x: x * 0, ck)})
    with pytest.raises(ValueError, match=r"saved but not in like: "
                       r"\['ema'\].*must hold the params alone"):
        series_lib._load(tmp_path / "state", {"params": ck}, None)
