"""The examples run and produce what they print."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    that GPT2LMHeadModel loads with the logits of the params saved, and a
    finite, positive LLC below d / 2 with no failed chain at each."""
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
