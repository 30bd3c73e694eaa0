"""Tests of sgld_optax.torch_interop against PyTorch and devinterp 2.0.1."""

import contextlib
import functools
import os
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from safetensors.torch import save_file as torch_save_safetensors  # noqa: E402

import sgld_optax as so  # noqa: E402
from sgld_optax import torch_interop as ti  # noqa: E402
from sgld_optax._src.interop import devinterp as ti_devinterp  # noqa: E402

# ---------------------------------------------------------------------------
# Models and helpers
# ---------------------------------------------------------------------------


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="fc1")(x)
        x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        return nn.Dense(3, name="fc2")(nn.gelu(x, approximate=False))


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 4, (3, 2), stride=2)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(self.conv2(x).mean(dim=(2, 3)))


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), padding=1, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
        x = nn.Conv(4, (3, 2), strides=2, padding="VALID", name="conv2")(nn.relu(x))
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


class TorchSeq(torch.nn.Module):
    """nn.Sequential inside a module, and an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                       torch.nn.Linear(6, 2))

    def forward(self, tokens):
        return self.net(self.embed(tokens)).sum(dim=1)


class FlaxSeq(nn.Module):
    def setup(self):
        self.embed = nn.Embed(7, 4)
        self.net = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(2)])

    def __call__(self, tokens):
        return self.net(self.embed(tokens)).sum(axis=1)


def torch_mlp(seed=0):
    torch.manual_seed(seed)
    model = TorchMLP()
    with torch.no_grad():  # make LayerNorm's affine part non-trivial
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model


def torch_cnn(seed=0):
    torch.manual_seed(seed)
    model = TorchCNN()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(17)
    return model.eval()


def flax_like(module, *shape, dtype=jnp.float32):
    return module.init(jax.random.key(0), jnp.ones(shape, dtype))


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype == torch.bool:
        assert torch.equal(a, b)
    else:
        view = width[a.element_size()]
        assert torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@contextlib.contextmanager
def quiet_sampler_warnings():
    """Silences the 'noise_level != 1' and 'nbeta == 1' warnings of both samplers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*noise_level.*")
        warnings.filterwarnings("ignore", message=".*nbeta.*")
        yield


def devinterp_sgld(params, **kwargs):
    from devinterp.optim.sgld import SGLD
    with quiet_sampler_warnings():
        return SGLD(params, **kwargs)


# ---------------------------------------------------------------------------
# Optional torch
# ---------------------------------------------------------------------------


def test_importing_sgld_optax_does_not_import_torch():
    code = ("import sys, sgld_optax, sgld_optax.torch_interop; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   timeout=120)


def test_without_torch(monkeypatch, tmp_path):
    sd = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
          "fc.bias": np.ones(2, np.float32)}
    pt_path = tmp_path / "model.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt_path)
    expected_tables = ti_devinterp._devinterp_tables(50, 7, 3, use_torch=True)

    monkeypatch.setitem(sys.modules, "torch", None)
    params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    for call in (lambda: ti.params_to_torch(params),
                 lambda: ti.params_from_torch(pt_path),
                 lambda: ti.save_torch_checkpoint(params, tmp_path / "x.pt")):
        with pytest.raises(ImportError, match=r"pip install 'sgld_optax\[torch\]'"):
            call()
    assert not (tmp_path / "x.pt").exists()

    # safetensors files and NumPy state dicts need no torch.
    st_path = ti.save_torch_checkpoint(params, tmp_path / "x.safetensors")
    back = ti.params_from_torch(st_path)
    np.testing.assert_array_equal(back["fc"]["kernel"], params["fc"]["kernel"])
    loaded = ti.params_from_torch(sd)
    np.testing.assert_array_equal(loaded["fc"]["kernel"], sd["fc.weight"].T)
    # devinterp's tables come out of NumPy's MT19937 bit for bit.
    cs = ti.devinterp_count_sketch(50, 7, seed=3)
    np.testing.assert_array_equal(cs.hash_indices, expected_tables[0])
    np.testing.assert_array_equal(cs.hash_signs, expected_tables[1])


# ---------------------------------------------------------------------------
# Params: equivalence of converted models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_like", [True, False])
def test_mlp_outputs_agree(use_like):
    model = torch_mlp()
    like = flax_like(FlaxMLP(), 1, 5)["params"]
    params = ti.params_from_torch(model.state_dict(),
                                  like=like if use_like else None)
    assert jax.tree.structure(params) == jax.tree.structure(like)
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    ours = FlaxMLP().apply({"params": params}, x)
    with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_like", [True, False])
def test_cnn_with_batchnorm_outputs_agree(use_like):
    model = torch_cnn()
    like = flax_like(FlaxCNN(), 1, 9, 8, 3)
    variables = ti.params_from_torch(model.state_dict(),
                                     like=like if use_like else None)
    assert jax.tree.structure(variables) == jax.tree.structure(like)
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"],
                                  model.bn.running_var.numpy())
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 8)).astype(np.float32)
    ours = FlaxCNN().apply(variables, x.transpose(0, 2, 3, 1))
    with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # Back to torch: strict loading accepts it, and num_batches_tracked is kept.
    fresh = TorchCNN().eval()
    fresh.load_state_dict(ti.params_to_torch(variables, like=model), strict=True)
    assert int(fresh.bn.num_batches_tracked) == 17
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(torch.from_numpy(x)).numpy(), theirs)


def test_sequential_and_embedding_match_with_template():
    torch.manual_seed(0)
    model = TorchSeq()
    like = flax_like(FlaxSeq(), 2, 3, dtype=jnp.int32)["params"]
    params = ti.params_from_torch(model, like=like)
    tokens = np.array([[1, 2, 6], [0, 5, 3]])
    ours = FlaxSeq().apply({"params": params}, tokens)
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    model.load_state_dict(ti.params_to_torch(params, like=model), strict=True)


def test_default_names_without_template():
    sd = {
        "layers.0.weight": torch.zeros(4, 3), "layers.0.bias": torch.zeros(4),
        "ln.weight": torch.zeros(4), "old.gamma": torch.zeros(5),
        "old.beta": torch.zeros(5),
        "tok_embed.weight": torch.zeros(9, 4),
        "conv.weight": torch.zeros(8, 3, 5, 2),
        "bn.running_mean": torch.zeros(4), "bn.running_var": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(3),
        "pos": torch.zeros(1, 7),
    }
    shapes = jax.tree.map(jnp.shape, ti.params_from_torch(sd))
    p = shapes["params"]
    assert p["layers_0"] == {"kernel": (3, 4), "bias": (4,)}
    assert p["ln"] == {"scale": (4,)}
    assert p["old"] == {"scale": (5,), "bias": (5,)}
    assert p["tok_embed"] == {"embedding": (9, 4)}
    assert p["conv"] == {"kernel": (5, 2, 3, 8)}
    assert p["pos"] == (1, 7)
    assert shapes["batch_stats"] == {"bn": {"mean": (4,), "var": (4,)}}
    assert "num_batches_tracked" not in str(shapes)
    # A top-level nn.Sequential index becomes layers_N, as in flax's Sequential.
    top = ti.params_from_torch({"0.weight": torch.zeros(2, 3)})
    assert jax.tree.map(jnp.shape, top) == {"layers_0": {"kernel": (3, 2)}}
    with pytest.raises(ValueError, match="Two checkpoint entries map to "
                                         "layers_0/kernel"):
        ti.params_from_torch({"0.weight": torch.zeros(2, 3),
                              "layers.0.weight": torch.zeros(2, 3)})


def test_layout_conversions_are_exact():
    rng = np.random.default_rng(0)
    w_lin = rng.normal(size=(4, 3)).astype(np.float32)
    w_conv = rng.normal(size=(8, 3, 5, 2)).astype(np.float32)
    w_conv1d = rng.normal(size=(8, 3, 5)).astype(np.float32)
    out = ti.params_from_torch({"lin.weight": w_lin, "c.weight": w_conv,
                                "c1.weight": w_conv1d})
    np.testing.assert_array_equal(out["lin"]["kernel"], w_lin.T)
    np.testing.assert_array_equal(out["c"]["kernel"],
                                  w_conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["c1"]["kernel"],
                                  w_conv1d.transpose(2, 1, 0))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def _random_tensor(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8,
          torch.uint8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bitwise(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = {"lin.weight": (4, 3), "lin.bias": (4,), "norm.weight": (4,),
              "conv.weight": (6, 2, 3, 3), "emb.weight": (10, 4),
              "scalar": ()}
    sd = {k: _random_tensor(s, dtype, gen) for k, s in shapes.items()}
    if dtype.is_floating_point:  # include signed zeros, infinities and NaN
        sd["lin.bias"][:] = torch.tensor([-0.0, float("inf"), float("-inf"),
                                          float("nan")]).to(dtype)
    params = ti.params_from_torch(sd)
    back = ti.params_to_torch(params, like=sd)
    assert list(back) == list(sd)
    for k in sd:
        assert_bitwise_equal(back[k], sd[k])
    if dtype is not torch.int64:  # int64 narrows to int32 without x64
        again = ti.params_to_torch(params)
        assert set(again) == set(sd)
        for k in sd:
            assert_bitwise_equal(again[k], sd[k])


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_checkpoint_files(writer, tmp_path):
    model = torch_cnn()
    path = tmp_path / ("model.pt" if writer == "torch.save" else "model.safetensors")
    if writer == "torch.save":
        torch.save(model.state_dict(), path)
    else:
        torch_save_safetensors(model.state_dict(), str(path))
    like = flax_like(FlaxCNN(), 1, 9, 8, 3)
    from_file = ti.params_from_torch(path, like=like)
    from_memory = ti.params_from_torch(model.state_dict(), like=like)
    jax.tree.map(np.testing.assert_array_equal, from_file, from_memory)
    # The format comes from the contents, not the name.
    renamed = path.rename(tmp_path / "model.bin")
    jax.tree.map(np.testing.assert_array_equal,
                 ti.params_from_torch(str(renamed), like=like), from_memory)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_torch_checkpoint(suffix, tmp_path):
    model = torch_mlp()
    params = ti.params_from_torch(model)
    path = ti.save_torch_checkpoint(params, tmp_path / f"out{suffix}", like=model)
    if suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file
        loaded = load_file(str(path))
    fresh = TorchMLP()
    fresh.load_state_dict(loaded, strict=True)
    for k, v in model.state_dict().items():
        assert_bitwise_equal(fresh.state_dict()[k], v)
    assert sorted(os.listdir(tmp_path)) == [f"out{suffix}"]  # no temporaries


def test_tensors_non_contiguous_and_requiring_grad():
    base = torch.randn(3, 4, requires_grad=True)
    sd = {"fc.weight": base.t(), "fc.bias": torch.randn(8)[::2].requires_grad_()}
    assert not sd["fc.weight"].is_contiguous()
    params = ti.params_from_torch(sd)
    np.testing.assert_array_equal(params["fc"]["kernel"], base.detach().numpy())
    np.testing.assert_array_equal(params["fc"]["bias"], sd["fc.bias"].detach().numpy())
    # The result is a copy: later changes to the tensor do not leak in.
    with torch.no_grad():
        base.add_(1.0)
    assert not np.array_equal(params["fc"]["kernel"], base.detach().numpy())


def test_device_placement():
    cpu = jax.devices("cpu")[0]
    params = ti.params_from_torch(torch_mlp(), device=cpu)
    assert all(x.devices() == {cpu} for x in jax.tree.leaves(params))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = ti.params_from_torch(torch_mlp(), device=sharding)
    assert all(x.sharding == sharding for x in jax.tree.leaves(params))


def test_64_bit_tensors_without_x64():
    assert not jax.config.jax_enable_x64
    ok = ti.params_from_torch({"idx": torch.arange(5)})
    assert ok["idx"].dtype == jnp.int32
    with pytest.raises(ValueError, match="idx.*int64.*jax_enable_x64"):
        ti.params_from_torch({"idx": torch.tensor([2**40])})
    with pytest.warns(UserWarning, match="float64 is stored as float32"):
        out = ti.params_from_torch({"w": torch.ones(3, dtype=torch.float64)})
    assert out["w"].dtype == jnp.float32


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_mismatches_are_listed_together():
    model = torch_mlp()
    like = flax_like(FlaxMLP(), 1, 5)["params"]
    sd = dict(model.state_dict())
    del sd["fc2.bias"]                      # missing
    sd["extra.weight"] = torch.zeros(2, 2)  # unexpected
    sd["fc1.weight"] = torch.zeros(16, 4)   # wrong shape
    with pytest.raises(ti.CheckpointMismatchError) as info:
        ti.params_from_torch(sd, like=like)
    msg = str(info.value)
    assert "3 problems" in msg
    assert "missing: fc2/bias (shape (3,))" in msg
    assert "unexpected: extra.weight (shape (2, 2))" in msg
    assert "fc1.weight (16, 4) -> (4, 16) vs fc1/kernel expected (5, 16)" in msg
    assert info.value.missing == [("fc2/bias", (3,))]
    assert isinstance(info.value, ValueError)


def test_params_to_torch_mismatch():
    model = torch_mlp()
    params = ti.params_from_torch(model)
    params["fc1"]["kernel"] = jnp.zeros((5, 15))
    params["other"] = {"bias": jnp.zeros(3)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ti.CheckpointMismatchError, match="other/bias") as info:
        ti.params_to_torch(params, like=model)
    assert "fc1.weight expected (16, 5)" in str(info.value)
    for k, v in model.state_dict().items():  # the template is untouched
        assert torch.equal(v, before[k])


def test_running_stats_with_params_only_template():
    like = flax_like(FlaxCNN(), 1, 9, 8, 3)["params"]
    with pytest.raises(ti.CheckpointMismatchError, match="batch_stats"):
        ti.params_from_torch(torch_cnn().state_dict(), like=like)


def test_non_tensor_values():
    sd = {"fc.weight": torch.zeros(2, 2), "step": 3,
          "optimizer": {"lr": 0.1}}
    with pytest.raises(TypeError) as info:
        ti.params_from_torch(sd)
    msg = str(info.value)
    assert "'step': holds a int" in msg
    assert "checkpoint['optimizer']" in msg
    with pytest.raises(TypeError, match="state dict"):
        ti.params_from_torch(42)
    with pytest.raises(ValueError, match="empty"):
        ti.params_from_torch({})


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ti.params_from_torch(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        ti.params_from_torch(text)
    with pytest.raises(ValueError, match="is not a checkpoint"):
        ti.params_from_torch(tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        ti.params_from_torch(broken)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        ti.params_from_torch(path)
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"w": torch.zeros(2), "obj": _Payload()}, zipped)
    with pytest.raises(ValueError, match="never runs code"):
        ti.params_from_torch(zipped)


def test_meta_tensors_are_rejected():
    with pytest.raises(ValueError, match="meta"):
        ti.params_from_torch({"w": torch.empty(2, device="meta")})


def test_save_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        ti.save_torch_checkpoint({"w": jnp.ones(2)}, tmp_path / "w.npz")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Sampler state
# ---------------------------------------------------------------------------

HP = dict(lr=1e-2, nbeta=4.0, noise_level=0.0, weight_decay=0.3,
          localization=5.0, bounding_box_size=0.02)


def _make_tx(**extra):
    with quiet_sampler_warnings():
        return so.sgld(HP["lr"], nbeta=HP["nbeta"], noise_level=0.0,
                       weight_decay=HP["weight_decay"],
                       localization=HP["localization"],
                       bounding_box_size=HP["bounding_box_size"], key=0, **extra)


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(64, 5, generator=gen), torch.randn(64, 3, generator=gen)


def _torch_steps(model, opt, n):
    x, y = _data()
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _jax_stepper(tx):
    x, y = (jnp.asarray(t.numpy()) for t in _data())

    def loss(p):
        return jnp.mean((FlaxMLP().apply({"params": p}, x) - y) ** 2)

    @jax.jit
    def run(params, state, n):
        def body(_, carry):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, updates), s
        return jax.lax.fori_loop(0, n, body, (params, state))

    return run


def _assert_params_close(params, model):
    for k, v in ti.params_to_torch(params, like=model).items():
        np.testing.assert_allclose(v.numpy(), model.state_dict()[k].numpy(),
                                   rtol=2e-5, atol=2e-6)


def test_state_from_torch_continues_like_torch():
    model = torch_mlp()
    opt = devinterp_sgld(model.parameters(), save_metrics=True, **HP)
    _torch_steps(model, opt, 5)
    w0 = {k: {"initial_param": v["initial_param"].clone()}
          for k, v in opt.state_dict()["state"].items()}
    params = ti.params_from_torch(model)  # the current, moved params
    tx = _make_tx(save_metrics=True)
    state = ti.sgld_state_from_torch(opt.state_dict(), params, tx,
                                     module=model, count=5)
    assert int(state.count) == 5
    np.testing.assert_array_equal(state.initial_params["fc1"]["kernel"],
                                  w0[0]["initial_param"].numpy().T)
    np.testing.assert_allclose(so.get_metrics(state).distance,
                               opt.get_metrics().distance.item(), rtol=1e-6)

    params, state = _jax_stepper(tx)(params, state, 7)
    _torch_steps(model, opt, 7)
    _assert_params_close(params, model)
    # The localization and box pulled towards w0: moving w0 mattered.
    assert float(so.get_metrics(state).localization) > 0


def test_state_to_torch_continues_like_jax():
    model = torch_mlp()
    params = ti.params_from_torch(model)
    tx = _make_tx(save_metrics=True)
    state = tx.init(params)
    run = _jax_stepper(tx)
    params, state = run(params, state, 5)

    sd = ti.sgld_state_to_torch(state, tx, module=model)
    model.load_state_dict(ti.params_to_torch(params, like=model), strict=True)
    opt = devinterp_sgld(model.parameters(), lr=0.5, nbeta=1.0, noise_level=0.0,
                         save_metrics=True)  # overwritten by load_state_dict
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert (group["lr"], group["nbeta"], group["localization"]) == (
        HP["lr"], HP["nbeta"], HP["localization"])
    assert torch.equal(opt.state[model.fc1.weight]["initial_param"],
                       ti.params_to_torch(state.initial_params, like=dict(
                           model.named_parameters()))["fc1.weight"])

    _torch_steps(model, opt, 7)
    params, state = run(params, state, 7)
    _assert_params_close(params, model)
    np.testing.assert_allclose(opt.get_metrics().distance.item(),
                               so.get_metrics(state).distance, rtol=1e-4)


def test_state_from_torch_checks_hyperparameters():
    model = torch_mlp()
    opt = devinterp_sgld(model.parameters(), **dict(HP, localization=1.0))
    params = ti.params_from_torch(model)
    with pytest.raises(ValueError, match=r"localization: devinterp param group "
                                         r"0 has 1\.0, tx has localization=5\.0"):
        ti.sgld_state_from_torch(opt.state_dict(), params, _make_tx(), module=model)
    with pytest.raises(ValueError, match="bounding_box_size"):
        ti.sgld_state_from_torch(
            opt.state_dict(), params, _make_tx(),
            hyperparams=dict(learning_rate=HP["lr"], nbeta=HP["nbeta"],
                             noise_level=0.0, weight_decay=HP["weight_decay"],
                             localization=1.0), module=model)
    # Schedules are evaluated at the step count.
    with quiet_sampler_warnings():
        tx = so.sgld(optax.linear_schedule(0.0, 2 * HP["lr"], 10), nbeta=HP["nbeta"],
                     noise_level=0.0, weight_decay=HP["weight_decay"],
                     localization=1.0, bounding_box_size=HP["bounding_box_size"], key=0)
    ti.sgld_state_from_torch(opt.state_dict(), params, tx, module=model, count=5)
    with pytest.raises(ValueError, match="lr: "):
        ti.sgld_state_from_torch(opt.state_dict(), params, tx, module=model, count=4)


def test_state_from_torch_needs_parameter_names():
    model = torch_mlp()
    opt = devinterp_sgld(model.parameters(), **HP)
    params = ti.params_from_torch(model)
    with pytest.raises(TypeError, match="module="):
        ti.sgld_state_from_torch(opt.state_dict(), params, _make_tx())
    names = [n for n, _ in model.named_parameters()]
    state = ti.sgld_state_from_torch(opt.state_dict(), params, _make_tx(),
                                     names=names)
    np.testing.assert_array_equal(state.initial_params["norm"]["scale"],
                                  model.norm.weight.detach().numpy())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        ti.sgld_state_from_torch({"w": 1}, params, _make_tx(), module=model)


def test_state_to_torch_without_initial_params():
    model = torch_mlp()
    params = ti.params_from_torch(model)
    with quiet_sampler_warnings():
        tx = so.sgld(1e-3, nbeta=2.0, key=0)
    state = tx.init(params)
    assert state.initial_params is None
    with pytest.raises(ValueError, match="params="):
        ti.sgld_state_to_torch(state, tx, module=model)
    sd = ti.sgld_state_to_torch(state, tx, module=model, params=params)
    opt = devinterp_sgld(model.parameters(), lr=1e-3, nbeta=2.0)
    opt.load_state_dict(sd)
    _torch_steps(model, opt, 1)


# ---------------------------------------------------------------------------
# Sampler state: devinterp SGMCMC.sgld and SGMCMC.rmsprop_sgld
# ---------------------------------------------------------------------------

# RMSprop divides the step by sqrt(V) + eps, up to 1/eps = 10 times larger:
# a smaller step and a wider box keep the chain off the box walls, so that
# the running mean shapes the steps.
SGMCMC_HP = {"sgld": HP,
             "rmsprop_sgld": dict(HP, lr=2e-3, bounding_box_size=0.5)}
RMS = dict(alpha=0.9, eps=0.1)
STATE_TYPES = {"sgld": so.SGLDState, "rmsprop_sgld": so.RMSpropSGLDState}


def devinterp_sgmcmc(sampler, params, **kwargs):
    from devinterp.optim.sgmcmc import SGMCMC
    if sampler == "rmsprop_sgld":
        kwargs = dict(RMS, **kwargs)
    with quiet_sampler_warnings():
        return getattr(SGMCMC, sampler)(params, **kwargs)


def _make_sampler_tx(sampler, **extra):
    hp = dict(SGMCMC_HP[sampler])
    hp.update(extra)
    lr = hp.pop("lr")
    if sampler == "rmsprop_sgld":
        hp = dict(RMS, **hp)
    with quiet_sampler_warnings():
        return getattr(so, sampler)(lr, key=0, **hp)


@functools.lru_cache(maxsize=None)
def _sampler_setup(sampler):
    """The transformation recording metrics and its jitted stepper, built
    (and compiled) once per sampler."""
    tx = _make_sampler_tx(sampler, save_metrics=True)
    return tx, _jax_stepper(tx)


def _to_torch_layout(tree, model):
    return ti.params_to_torch(tree, like=dict(model.named_parameters()))


def _loc_key(opt):
    """The state key of the localization centre of a devinterp SGMCMC."""
    (prior,) = [p for p in opt.param_groups[0]["prior"].priors
                if p.center == "initial"]
    return prior.key


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_sgmcmc_state_from_torch_continues_like_torch(sampler):
    model = torch_mlp()
    opt = devinterp_sgmcmc(sampler, model.parameters(), save_metrics=True,
                           **SGMCMC_HP[sampler])
    _torch_steps(model, opt, 5)
    assert _loc_key(opt) == "prior_center_1"  # after the weight decay prior
    params = ti.params_from_torch(model)
    tx, run = _sampler_setup(sampler)
    state = ti.sgld_state_from_torch(opt, params, tx, module=model, count=5)
    assert isinstance(state, STATE_TYPES[sampler]) and int(state.count) == 5
    fc1 = opt.state[model.fc1.weight]
    np.testing.assert_array_equal(state.initial_params["fc1"]["kernel"],
                                  fc1["prior_center_1"].numpy().T)
    if sampler == "rmsprop_sgld":
        assert fc1["square_avg"].abs().min() > 0
        for k, v in _to_torch_layout(state.square_avg, model).items():
            assert_bitwise_equal(v, opt.state[model.get_parameter(k)]
                                 ["square_avg"])
    np.testing.assert_allclose(so.get_metrics(state).distance,
                               opt.get_metrics().distance.item(), rtol=1e-6)

    params, state = run(params, state, 7)
    _torch_steps(model, opt, 7)
    _assert_params_close(params, model)
    assert float(so.get_metrics(state).localization) > 0
    if sampler == "rmsprop_sgld":
        for k, v in _to_torch_layout(state.square_avg, model).items():
            np.testing.assert_allclose(
                v.numpy(), opt.state[model.get_parameter(k)]["square_avg"],
                rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_sgmcmc_state_to_torch_continues_like_jax(sampler):
    model = torch_mlp()
    params = ti.params_from_torch(model)
    tx, run = _sampler_setup(sampler)
    params, state = run(params, tx.init(params), 5)

    sd = ti.sgld_state_to_torch(state, tx, module=model, target="SGMCMC")
    model.load_state_dict(ti.params_to_torch(params, like=model), strict=True)
    # Built with other hyperparameters: load_state_dict replaces them.
    opt = devinterp_sgmcmc(sampler, model.parameters(), lr=0.5, nbeta=1.0,
                           localization=1.0, save_metrics=True)
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    hp = SGMCMC_HP[sampler]
    assert (group["lr"], group["nbeta"], group["noise_level"],
            group["bounding_box_size"]) == (
        hp["lr"], hp["nbeta"], 0.0, hp["bounding_box_size"])
    assert [(p.localization, p.center, p.key) for p in group["prior"].priors] == [
        (hp["weight_decay"], None, "prior_center_0"),
        (hp["localization"], "initial", "prior_center_1")]
    if sampler == "rmsprop_sgld":
        pre = group["preconditioner"]
        assert (type(pre).__name__, pre.alpha, pre.eps) == (
            "RMSpropPreconditioner", RMS["alpha"], RMS["eps"])
    w0 = _to_torch_layout(state.initial_params, model)
    for name, p in model.named_parameters():
        assert opt.state[p]["prior_center_0"] is None
        assert torch.equal(opt.state[p]["prior_center_1"], w0[name])
        assert torch.equal(opt.state[p]["initial_param"], w0[name])
    if sampler == "rmsprop_sgld":
        for k, v in _to_torch_layout(state.square_avg, model).items():
            assert v.abs().min() > 0
            assert torch.equal(opt.state[model.get_parameter(k)]["square_avg"], v)

    _torch_steps(model, opt, 7)
    params, state = run(params, state, 7)
    _assert_params_close(params, model)
    np.testing.assert_allclose(opt.get_metrics().distance.item(),
                               so.get_metrics(state).distance, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_sgmcmc_round_trips(sampler):
    # devinterp -> sgld_optax -> devinterp keeps every tensor bit for bit.
    model = torch_mlp()
    opt = devinterp_sgmcmc(sampler, model.parameters(), save_metrics=True,
                           **SGMCMC_HP[sampler])
    _torch_steps(model, opt, 3)
    params = ti.params_from_torch(model)
    tx, run = _sampler_setup(sampler)
    state = ti.sgld_state_from_torch(opt.state_dict(), params, tx,
                                     module=model, count=3)
    sd = ti.sgld_state_to_torch(state, tx, module=model, target="SGMCMC")
    ref = opt.state_dict()
    assert sd["state"].keys() == ref["state"].keys()
    for i, s in ref["state"].items():
        assert sd["state"][i].keys() == s.keys(), (sd["state"][i].keys(), s.keys())
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                assert_bitwise_equal(sd["state"][i][k], v)
            else:
                assert sd["state"][i][k] == v, k
    (g,), (rg,) = sd["param_groups"], ref["param_groups"]
    for k in ("lr", "nbeta", "noise_level", "bounding_box_size", "mask", "params"):
        assert g[k] == rg[k], k
    assert repr(g["prior"]) == repr(rg["prior"])
    assert repr(g["preconditioner"]) == repr(rg["preconditioner"])
    for f in ("distance", "localization", "scaled_grad", "dot_grad_prior"):
        assert_bitwise_equal(getattr(g["metrics"], f), getattr(rg["metrics"], f))
    assert g["metrics"].numel == rg["metrics"].numel

    # sgld_optax -> devinterp -> sgld_optax gives back the state.
    params, state = run(params, state, 2)
    sd = ti.sgld_state_to_torch(state, tx, module=model, target="SGMCMC")
    opt = devinterp_sgmcmc(sampler, model.parameters(), save_metrics=True,
                           **SGMCMC_HP[sampler])
    opt.load_state_dict(sd)
    back = ti.sgld_state_from_torch(opt, params, tx, module=model, count=5,
                                    key=state.key)
    assert type(back) is type(state)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(jax.random.key_data, (back.key,)) + back[2:],
                 jax.tree.map(jax.random.key_data, (state.key,)) + state[2:])
    assert int(back.count) == int(state.count) == 5


def _masks(model):
    """A 0/1 float mask per parameter, with zeros and ones in each."""
    gen = torch.Generator().manual_seed(5)
    return {n: (torch.rand(p.shape, generator=gen) < 0.6).float()
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_sgmcmc_masks(sampler):
    model = torch_mlp()
    masks = _masks(model)
    opt = devinterp_sgmcmc(sampler, model.parameters(), mask=list(masks.values()),
                           **SGMCMC_HP[sampler])
    assert type(opt.param_groups[0]["preconditioner"]).__name__ == (
        "MaskPreconditioner" if sampler == "sgld" else "CompositePreconditioner")
    _torch_steps(model, opt, 3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = ti.params_from_torch(model)
    mask = ti.params_from_torch(masks)
    tx = _make_sampler_tx(sampler, mask=mask)
    state = ti.sgld_state_from_torch(opt, params, tx, module=model, count=3)
    run = _jax_stepper(tx)
    params, state = run(params, state, 4)
    _torch_steps(model, opt, 4)
    _assert_params_close(params, model)
    for n, p in model.named_parameters():
        off = masks[n] == 0
        assert torch.equal(p.detach()[off], frozen[n][off])
        assert not torch.equal(p.detach()[~off], frozen[n][~off])

    # Exported masks make a fresh devinterp optimizer take the same steps.
    sd = ti.sgld_state_to_torch(state, tx, module=model, target="SGMCMC")
    assert all(torch.equal(a, b) for a, b in zip(sd["param_groups"][0]["mask"],
                                                 masks.values()))
    opt2 = devinterp_sgmcmc(sampler, model.parameters(), **SGMCMC_HP[sampler])
    opt2.load_state_dict(pickle.loads(pickle.dumps(sd)))  # also as a file
    params, state = run(params, state, 3)
    _torch_steps(model, opt2, 3)
    _assert_params_close(params, model)

    # A mask that differs anywhere is refused.
    other = jax.tree.map(lambda m: m.at[(0,) * m.ndim].set(1 - m[(0,) * m.ndim]),
                         mask)
    with pytest.raises(ValueError, match="mask: the devinterp masks of fc1/bias, "
                                         "fc1/kernel, fc2/bias"):
        ti.sgld_state_from_torch(opt, params, _make_sampler_tx(sampler, mask=other),
                                 module=model)
    with pytest.raises(ValueError, match="mask: devinterp param group 0 has mask, "
                                         "tx has none"):
        ti.sgld_state_from_torch(opt, params, _make_sampler_tx(sampler),
                                 module=model)


def test_sgmcmc_hyperparameters_are_checked():
    model = torch_mlp()
    params = ti.params_from_torch(model)
    rms = devinterp_sgmcmc("rmsprop_sgld", model.parameters(),
                           **SGMCMC_HP["rmsprop_sgld"])
    _torch_steps(model, rms, 2)
    with pytest.raises(ValueError, match=r"alpha: devinterp param group 0 has "
                                         r"0\.9, tx has alpha=0\.99"):
        ti.sgld_state_from_torch(rms, params, _make_sampler_tx(
            "rmsprop_sgld", alpha=0.99), module=model)
    with pytest.raises(ValueError, match=r"eps: devinterp param group 0 has "
                                         r"0\.1, tx has eps=0\.01"):
        ti.sgld_state_from_torch(rms, params, _make_sampler_tx(
            "rmsprop_sgld", eps=0.01), module=model)
    with pytest.raises(ValueError, match="sampler: the devinterp optimizer is "
                                         "SGMCMC.rmsprop_sgld, tx is sgld_optax.sgld"):
        ti.sgld_state_from_torch(rms, params, _make_sampler_tx(
            "sgld", **SGMCMC_HP["rmsprop_sgld"]), module=model)
    sgld = devinterp_sgmcmc("sgld", model.parameters(),
                            **dict(HP, weight_decay=0.0, bounding_box_size=None))
    with pytest.raises(ValueError) as err:
        ti.sgld_state_from_torch(sgld, params, _make_sampler_tx("sgld"),
                                 module=model)
    assert ("weight_decay: devinterp param group 0 has 0.0, tx has "
            "weight_decay=0.3") in str(err.value)
    assert ("bounding_box_size: devinterp param group 0 has None, tx has "
            "bounding_box_size=0.02") in str(err.value)
    ti.sgld_state_from_torch(sgld, params, _make_sampler_tx(
        "sgld", weight_decay=0.0, bounding_box_size=None), module=model)
    # Through hyperparams=, for a composed transformation.
    tx = optax.chain(optax.identity(), _make_sampler_tx("rmsprop_sgld"))
    hyperparams = dict(learning_rate=2e-3, nbeta=HP["nbeta"], noise_level=0.0,
                       weight_decay=HP["weight_decay"],
                       localization=HP["localization"], bounding_box_size=0.5,
                       **RMS)
    state = ti.sgld_state_from_torch(rms, params, tx, module=model,
                                     hyperparams=hyperparams)
    assert isinstance(state[1], so.RMSpropSGLDState)
    np.testing.assert_array_equal(state[1].square_avg["fc1"]["kernel"],
                                  rms.state[model.fc1.weight]["square_avg"].T)
    with pytest.raises(ValueError, match="alpha: "):
        ti.sgld_state_from_torch(rms, params, tx, module=model,
                                 hyperparams=dict(hyperparams, alpha=0.99))


@pytest.mark.parametrize("extra", [dict(initial_square_avg=1e-3),
                                   dict(bias_correction=True)])
def test_rmsprop_options_without_devinterp_equivalent(extra):
    model = torch_mlp()
    params = ti.params_from_torch(model)
    tx = _make_sampler_tx("rmsprop_sgld", **extra)
    match = f"{next(iter(extra))}=.* has no devinterp equivalent"
    with pytest.raises(ValueError, match=match):
        ti.sgld_state_to_torch(tx.init(params), tx, module=model)
    opt = devinterp_sgmcmc("rmsprop_sgld", model.parameters(),
                           **SGMCMC_HP["rmsprop_sgld"])
    with pytest.raises(ValueError, match=match):
        ti.sgld_state_from_torch(opt, params, tx, module=model)


def _unsupported_optimizers(model):
    from devinterp.optim.preconditioner import IdentityPreconditioner
    from devinterp.optim.sgmcmc import SGMCMC

    class Custom(IdentityPreconditioner):
        pass

    with quiet_sampler_warnings():
        yield "NHTPreconditioning.* of SGMCMC.sgnht", SGMCMC.sgnht(
            model.parameters(), lr=1e-3, nbeta=4.0)
    yield "torch.optim.sgd.SGD|fields .*'momentum'", torch.optim.SGD(
        model.parameters(), lr=0.1)
    yield "custom preconditioner .*Custom", SGMCMC(
        model.parameters(), lr=1e-3, nbeta=4.0, preconditioner=Custom())
    yield "GaussianPrior with given centres", SGMCMC(
        model.parameters(), lr=1e-3, nbeta=4.0,
        prior=[torch.zeros_like(p) for p in model.parameters()])


def test_unsupported_optimizers_are_refused():
    model = torch_mlp()
    params = ti.params_from_torch(model)
    tx = _make_sampler_tx("sgld")
    supported = (r"Supported are devinterp's SGLD \(devinterp.optim.sgld.SGLD\), "
                 r"SGMCMC.sgld and SGMCMC.rmsprop_sgld")
    for what, opt in _unsupported_optimizers(model):
        _torch_steps(model, opt, 1)
        for source in (opt, opt.state_dict()):
            with pytest.raises(ValueError, match=supported) as err:
                ti.sgld_state_from_torch(source, params, tx, module=model)
            assert re.search(f"Unsupported optimizer: .*({what})",
                             str(err.value)), str(err.value)
    # Samplers with no devinterp counterpart, the other way.
    for factory in (so.sghmc, so.sgnht):
        with quiet_sampler_warnings():
            tx = factory(1e-3, nbeta=4.0, key=0)
        with pytest.raises(ValueError, match="no counterpart among the devinterp "
                                             "optimizers supported"):
            ti.sgld_state_to_torch(tx.init(params), tx, module=model)
    tx = _make_sampler_tx("rmsprop_sgld")
    with pytest.raises(ValueError, match="target='SGMCMC'"):
        ti.sgld_state_to_torch(tx.init(params), tx, module=model, target="SGLD")


def test_sgld_state_still_moves_to_and_from_devinterp_sgld():
    # The deprecated devinterp SGLD: an optimizer object works as its
    # state dict does, and sgld state goes to it by default.
    model = torch_mlp()
    opt = devinterp_sgld(model.parameters(), **HP)
    _torch_steps(model, opt, 2)
    params = ti.params_from_torch(model)
    tx = _make_tx()
    state = ti.sgld_state_from_torch(opt, params, tx, module=model, count=2)
    assert isinstance(state, so.SGLDState)
    np.testing.assert_array_equal(
        state.initial_params["fc2"]["kernel"],
        opt.state[model.fc2.weight]["initial_param"].numpy().T)
    sd = ti.sgld_state_to_torch(state, tx, module=model)
    assert "localization" in sd["param_groups"][0]
    assert "prior" not in sd["param_groups"][0]
    with pytest.raises(ValueError, match="sampler: the devinterp optimizer is "
                                         "SGLD, tx is sgld_optax.rmsprop_sgld"):
        ti.sgld_state_from_torch(opt, params, _make_sampler_tx(
            "rmsprop_sgld", **HP), module=model)


# ---------------------------------------------------------------------------
# Count sketches
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("input_dim,output_dim,seed",
                         [(1, 1, 0), (100, 7, 0), (1000, 64, 12345),
                          (333, 2**20, 2**32 - 1)])
def test_count_sketch_tables_match_devinterp(input_dim, output_dim, seed):
    from devinterp.optim.sketch import CountSketch as DevinterpCountSketch
    ref = DevinterpCountSketch.create(input_dim, output_dim, seed)
    cs = ti.devinterp_count_sketch(input_dim, output_dim, seed=seed)
    assert isinstance(cs, so.CountSketch)
    assert (cs.input_dim, cs.output_dim) == (input_dim, output_dim)
    assert cs.hash_indices.dtype == np.int32 and cs.hash_signs.dtype == np.int8
    np.testing.assert_array_equal(cs.hash_indices, ref.hash_indices.numpy())
    np.testing.assert_array_equal(cs.hash_signs, ref.hash_signs.numpy())
    for use_torch in (True, False):
        idx, sgn = ti_devinterp._devinterp_tables(input_dim, output_dim, seed, use_torch)
        np.testing.assert_array_equal(idx, ref.hash_indices.numpy())
        np.testing.assert_array_equal(sgn, ref.hash_signs.numpy())
    v = np.random.default_rng(seed % 7).normal(size=input_dim).astype(np.float32)
    np.testing.assert_allclose(cs.sketch(jnp.asarray(v)),
                               ref.sketch(torch.from_numpy(v)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_sampler_sketches_match_devinterp():
    model = torch_mlp()
    params = ti.params_from_torch(model)
    numel = sum(p.numel() for p in model.parameters())
    opt = devinterp_sgld(model.parameters(), sketch_dim=32, sketch_seed=7, **HP)
    _torch_steps(model, opt, 1)
    cs = ti.devinterp_count_sketch(numel, 32, seed=7, params=params, module=model)
    tx = _make_tx(sketch=cs)
    state = tx.init(params)
    _, state = _jax_stepper(tx)(params, state, 1)
    ours, theirs = so.get_sketches(state), opt.get_sketches()
    for field in ("scaled_grad", "unscaled_grad", "localization",
                  "weight_decay", "noise"):
        np.testing.assert_allclose(getattr(ours, field),
                                   getattr(theirs, field).numpy(),
                                   rtol=1e-4, atol=1e-7, err_msg=field)
    assert np.abs(np.asarray(ours.scaled_grad)).max() > 0
    # Without reordering the tables, the Flax layout hashes differently.
    plain = _make_tx(sketch=ti.devinterp_count_sketch(numel, 32, seed=7))
    _, plain_state = _jax_stepper(plain)(params, plain.init(params), 1)
    assert not np.allclose(so.get_sketches(plain_state).scaled_grad,
                           theirs.scaled_grad.numpy(), rtol=1e-3)


def test_count_sketch_argument_checks():
    params = ti.params_from_torch(torch_mlp())
    with pytest.raises(ValueError, match="input_dim"):
        ti.devinterp_count_sketch(10, 4, params=params, module=torch_mlp())
    with pytest.raises(TypeError, match="params="):
        ti.devinterp_count_sketch(10, 4, module=torch_mlp())


def test_public_names_are_documented():
    for name in ti.__all__:
        doc = getattr(ti, name).__doc__
        assert doc and "Example" in doc or name == "CheckpointMismatchError", name



def test_state_with_extra_priors_is_refused():
    """devinterp's SGLD and SGMCMC factories take weight decay and
    localization only: a sampler with further priors cannot cross over."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    params = ti.params_from_torch(lin)
    prior = so.GaussianPrior(2.0, center=None)
    tx = so.sgld(1e-3, nbeta=10.0, localization=1.0, priors=[prior], key=0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="priors="):
        ti.sgld_state_to_torch(state, tx, module=lin)


def test_nnx_state_as_like_and_as_params():
    """An nnx.State as `like` gives an nnx.State the model loads, with the
    torch model's outputs; params_to_torch reads it back bitwise."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(4, 8, rngs=rngs)
            self.fc2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jnp.tanh(self.fc1(x)))

    torch.manual_seed(0)
    tmodel = torch.nn.Sequential()
    tmodel.fc1 = torch.nn.Linear(4, 8)
    tmodel.act = torch.nn.Tanh()
    tmodel.fc2 = torch.nn.Linear(8, 3)
    model = MLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    before = np.asarray(state["fc1"]["kernel"][...])
    params = ti.params_from_torch(tmodel, like=state)
    assert isinstance(params, nnx.State)
    # The template (the model's own Variables) is untouched.
    np.testing.assert_array_equal(state["fc1"]["kernel"][...], before)
    nnx.update(model, params)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    want = tmodel(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want,
                               rtol=1e-5, atol=1e-6)
    back = ti.params_to_torch(params, like=tmodel)
    for name, tensor in tmodel.state_dict().items():
        assert torch.equal(back[name], tensor), name
