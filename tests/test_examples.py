"""The examples run and produce what they print."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgld_optax as so

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

LR = 1e-4                      # quickstart's learning rate
NUMEL = 4 * 32 + 32 + 32 + 1   # 4 inputs -> 32 hidden -> 1 output


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sampler,noise_factor", [
    ("sgld", 1.0),       # noise sqrt(lr) * eta
    ("sghmc", 0.1),      # sqrt(momentum_decay * lr) * eta
    ("sgnht", 0.01),     # sqrt(diffusion_factor * lr) * eta
])
def test_quickstart_samples_and_records_metrics(capsys, sampler, noise_factor):
    losses, metrics, state = _load("quickstart").main(steps=50, seed=1,
                                                      sampler=sampler)
    out = capsys.readouterr().out
    assert f"sampled 50 {sampler} steps" in out
    assert type(state).__name__ == {"sgld": "SGLDState", "sghmc": "SGHMCState",
                                    "sgnht": "SGNHTState"}[sampler]
    assert losses.shape == (50,) and np.all(np.isfinite(losses))
    # Every parameter is sampled.
    assert int(metrics.numel[-1]) == NUMEL
    # The chain leaves the trained weights, and the noise has the sampler's
    # scale: E|sqrt(c lr) eta| ~ sqrt(c lr numel), averaged over 50 steps.
    assert float(metrics.distance[-1]) > 0
    np.testing.assert_allclose(np.mean(np.asarray(metrics.noise)),
                               np.sqrt(noise_factor * LR * NUMEL), rtol=0.03)
    assert jnp.all(metrics.localization[1:] > 0)


def test_quickstart_rmsprop_sgld_preconditions_the_noise(capsys):
    losses, metrics, state = _load("quickstart").main(
        steps=50, seed=1, sampler="rmsprop_sgld")
    assert "sampled 50 rmsprop_sgld steps" in capsys.readouterr().out
    assert np.all(np.isfinite(losses))
    # The last step's noise is sqrt(lr) sqrt(G) eta with G = 1 / (sqrt(V) + eps)
    # from the final running mean V: its norm is about sqrt(lr * sum(G)).
    g_sum = sum(float(jnp.sum(1.0 / (jnp.sqrt(v) + 0.1)))
                for v in jax.tree.leaves(state.square_avg))
    assert g_sum > 2 * NUMEL   # far from SGLD's G = 1
    np.testing.assert_allclose(float(metrics.noise[-1]), np.sqrt(LR * g_sum),
                               rtol=0.15)
    # The raw gradient is not preconditioned, the gradient term is.
    assert not np.allclose(np.asarray(metrics.scaled_grad[1:]),
                           np.asarray(metrics.unscaled_grad[1:]), rtol=0.1)


def test_gpt2_llc_example(tmp_path, capsys):
    """The GPT-2 example, small: the HF model's logits in Flax, checkpoints
    that GPT2LMHeadModel loads with the logits of the params saved, a
    finite, positive LLC below d / 2 with no failed chain at each, and the
    series' estimate at a checkpoint file the one `estimate_llc` gives on
    the params read from it, with the same key."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    example = _load("gpt2_llc")
    plot = tmp_path / "gpt2_llc.png"
    out = example.main(train_steps=120, checkpoints=2, num_chains=2,
                       num_draws=40, num_sequences=96, seq_len=32,
                       out_dir=str(tmp_path / "ckpt"), plot=str(plot))
    printed = capsys.readouterr().out
    for step in ("1.", "2.", "3.", "4."):
        assert f"\n{step} " in "\n" + printed
    assert out["logits_max_diff"] < 1e-5
    assert out["steps"] == [60, 120] and len(out["results"]) == 2
    series = out["series"]
    np.testing.assert_array_equal(series.steps, [60, 120])
    assert out["results"] == series.results
    for step, result in zip((60, 120), series.results):
        assert f"step {step:5d}: L_n = {result.init_loss:.3f}, LLC = " \
            f"{result.llc_mean:7.2f}" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["train_losses"][-1] < out["train_losses"][0] - 0.5

    config = example.GPT2Config(n_positions=32)
    d = out["num_params"]
    assert d == sum(p.numel() for p in example.torch_model(config).parameters())
    apply_fn = jax.jit(example.make_apply(config))
    ids = np.random.default_rng(5).integers(0, config.vocab_size, (3, 32))
    for path, result in zip(out["paths"], out["results"]):
        assert np.all(result.failures == "") and not np.any(result.diverged)
        assert np.isfinite(result.llc_mean) and 0 < result.llc_mean < d / 2
        model = example.torch_model(config, seed=1)
        model.load_state_dict(load_file(path), strict=True)
        with torch.no_grad():
            want = model(torch.as_tensor(ids)).logits.numpy()
        params = example.torch_interop.params_from_torch(
            path, like=example.template(config),
            rules=example.torch_interop.gpt2_rules())
        np.testing.assert_allclose(apply_fn(params, ids), want, atol=1e-5,
                                   rtol=1e-5)

    # The series' last checkpoint against estimate_llc there, same key.
    tokens, _ = example.markov_sequences(96, 32, config.vocab_size, seed=0)
    single = so.estimate_llc(
        so.causal_lm_loss(example.make_apply(config)), params,
        so.token_data(tokens), key=0, num_chains=2, num_draws=40,
        progress=False, **example.LLC)
    last = series.results[-1]
    np.testing.assert_allclose(last.loss_trace, single.loss_trace, rtol=2e-5,
                               atol=1e-7)
    assert last.init_loss == pytest.approx(single.init_loss, rel=1e-6)
    assert series.llc_mean[-1] == pytest.approx(single.llc_mean, rel=1e-4)


@pytest.mark.parametrize("size", ["short", "mixed"])
def test_calibrate_mlp_example(tmp_path, capsys, size):
    """The calibration example, small: one table row per grid point, a grid
    point's chains those `estimate_llc` samples with the same key and
    settings, and the final estimate (when a point is recommended) the
    `estimate_llc` run at the recommended setting, exported to ArviZ.

    The short sweep's chains cannot have mixed, so nothing is recommended;
    the longer one's do, and a point is (which one is not asserted)."""
    pytest.importorskip("arviz")
    example = _load("calibrate_mlp")
    kwargs = dict(
        short=dict(train_steps=300, n=256, num_draws=60, num_burnin_steps=10,
                   final_draws=60, learning_rates=(3e-4, 1e-3),
                   nbetas=(20.0, 50.0)),
        mixed=dict(num_draws=2000, num_burnin_steps=300, final_draws=300,
                   learning_rates=(2e-3, 4e-3), nbetas=(30.0, 90.0)),
    )[size]
    plot = tmp_path / "calibration.png"
    out = example.main(plot=str(plot), **kwargs)
    printed = capsys.readouterr().out
    cal = out["calibration"]
    lrs, nbs = kwargs["learning_rates"], kwargs["nbetas"]
    np.testing.assert_allclose(cal.learning_rates, lrs)
    np.testing.assert_allclose(cal.nbetas, nbs)
    np.testing.assert_allclose(cal.localizations, [example.LOCALIZATION])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The table, printed: a header, one row per grid point, the reason.
    table = cal.table().splitlines()
    assert cal.table() in printed and cal.reason in printed
    assert len(table) == 1 + len(lrs) * len(nbs) + 1
    for row, (lr, nb) in zip(table[1:-1], [(a, b) for a in lrs for b in nbs]):
        assert row.lstrip("* ").split()[:2] == [f"{lr:.3g}", f"{nb:.3g}"]

    # A grid point: the chains estimate_llc samples with the same settings.
    common = dict(localization=example.LOCALIZATION, num_chains=4,
                  num_burnin_steps=kwargs["num_burnin_steps"], batch_size=64,
                  mala=True, progress=False)
    single = so.estimate_llc(out["loss_fn"], out["params"], out["data"],
                             learning_rate=lrs[1], nbeta=nbs[0], key=0,
                             num_draws=kwargs["num_draws"], **common)
    point = cal.results[1][0][0]
    np.testing.assert_allclose(point.loss_trace, single.loss_trace,
                               rtol=2e-5, atol=1e-7)
    assert cal.llc_mean[1, 0, 0] == pytest.approx(single.llc_mean, rel=1e-4)

    final = out["final"]
    if size == "short":  # 60 draws: no chain has mixed
        assert cal.recommended is None
        assert final is None and out["idata"] is None
        assert "no setting is recommended" in printed
        return
    assert cal.recommended is not None, cal.reason
    # The final estimate: estimate_llc at the recommended setting, key 1.
    lr, nbeta, loc = cal.recommended
    assert loc == example.LOCALIZATION and (lr, nbeta) in [
        (a, b) for a in lrs for b in nbs]
    want = so.estimate_llc(
        out["loss_fn"], out["params"], out["data"], learning_rate=lr,
        nbeta=nbeta, key=1, num_draws=kwargs["final_draws"], **common)
    np.testing.assert_array_equal(final.loss_trace, want.loss_trace)
    np.testing.assert_array_equal(final.mala_acceptance, want.mala_acceptance)
    assert final.summary() in printed
    posterior = out["idata"].posterior
    assert posterior["llc"].shape == (4, kwargs["final_draws"])
    assert float(posterior["llc"].mean()) == pytest.approx(final.llc_mean,
                                                           rel=1e-6)
    assert "sample_stats" in out["idata"].groups()
