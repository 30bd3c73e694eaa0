"""Language models: the next-token loss against transformers and a float64
oracle, token data from every source giving the same LLC, and the LLC of the
GPT-2 example against devinterp's own `llc()`.

The models are built from tiny configs with random weights: nothing is
downloaded.
"""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sgld_optax as so  # noqa: E402
from sgld_optax import torch_interop as ti  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt2 = _load_example("gpt2_llc")
CONFIG = gpt2.GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_head=4,
                         n_layer=2)


def randomized_gpt2(seed=0, std=0.2):
    """An HF GPT-2 with weights of order one, so that the logits are far
    from uniform and a wrong token or shift changes the loss."""
    from test_interop_rules import randomize
    return randomize(gpt2.torch_model(CONFIG, seed), std=std, seed=seed)


# ---------------------------------------------------------------------------
# The loss


def test_causal_lm_loss_is_transformers_gpt2_labels_loss():
    """`GPT2LMHeadModel(ids, labels=ids).loss`, with the labels of padding
    set to -100 when there is an attention mask, to 1e-5."""
    model = randomized_gpt2()
    params = ti.params_from_torch(model, like=gpt2.template(CONFIG),
                                  rules=ti.gpt2_rules())
    apply_fn = gpt2.make_apply(CONFIG)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CONFIG.vocab_size, (6, 16))
    lengths = np.array([16, 16, 11, 7, 2, 1])      # right padding
    mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int64)
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        want_plain = float(model(t_ids, labels=t_ids).loss)
        want_masked = float(model(t_ids, attention_mask=t_mask,
                                  labels=t_ids.masked_fill(t_mask == 0,
                                                           -100)).loss)

    plain = jax.jit(so.causal_lm_loss(apply_fn))
    np.testing.assert_allclose(float(plain(params, ids)), want_plain,
                               rtol=1e-5)
    np.testing.assert_allclose(
        float(plain(params, {"input_ids": ids})), want_plain, rtol=1e-5)
    batch = {"input_ids": ids, "attention_mask": mask, "text_id": ids[:, 0]}
    for pass_mask in (False, True):
        loss = jax.jit(so.causal_lm_loss(apply_fn,
                                         pass_attention_mask=pass_mask))
        np.testing.assert_allclose(float(loss(params, batch)), want_masked,
                                   rtol=1e-5)
    # Padding counts without the mask: the masked loss is another number.
    assert abs(want_plain - want_masked) > 1e-2


def _oracle_loss(logits, ids, mask):
    """The documented loss in float64: token t + 1 counts where it is real."""
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask is not None and mask[b, t + 1] == 0:
                continue
            row = logits[b, t]
            log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            total += log_z - row[ids[b, t + 1]]
            count += 1
    return total / max(count, 1)


def test_causal_lm_loss_counts_the_documented_tokens():
    """Against a float64 loop over (b, t): holes and left padding in the
    mask, bfloat16 logits (taken in float32), and a batch with no counted
    token (loss 0)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, (4, 6)).astype(np.int32)
    logits = (3 * rng.normal(size=(4, 6, 7))).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1, 1],      # left padding
                     [1, 0, 1, 1, 0, 1],      # holes
                     [1, 0, 0, 0, 0, 0]])     # nothing predicted
    lookup = lambda table, ids: table        # the "model" returns its params
    loss = jax.jit(so.causal_lm_loss(lookup))
    np.testing.assert_allclose(float(loss(logits, ids)),
                               _oracle_loss(logits, ids, None), rtol=1e-6)
    batch = {"input_ids": ids, "attention_mask": mask}
    np.testing.assert_allclose(float(loss(logits, batch)),
                               _oracle_loss(logits, ids, mask), rtol=1e-6)
    low = jnp.asarray(logits, jnp.bfloat16)
    np.testing.assert_allclose(
        float(loss(low, batch)),
        _oracle_loss(np.asarray(low.astype(jnp.float32)), ids, mask),
        rtol=1e-6)
    assert loss(low, batch).dtype == jnp.float32
    empty = {"input_ids": ids[3:], "attention_mask": mask[3:]}
    assert float(loss(logits[3:], empty)) == 0.0

    # The model sees the mask only when asked.
    seen = []
    spy = lambda table, ids, *mask: seen.append(len(mask)) or table
    so.causal_lm_loss(spy, pass_attention_mask=True)(logits, batch)
    so.causal_lm_loss(spy)(logits, batch)
    assert seen == [1, 0]


def test_causal_lm_loss_rejects_bad_shapes():
    table = jnp.zeros((5, 5))
    bigram = lambda w, ids: w[ids]
    loss = so.causal_lm_loss(bigram)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        loss(table, jnp.zeros((3, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        loss(table, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        loss(table, jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        loss(table, {"input_ids": jnp.zeros((3, 4), jnp.int32),
                     "attention_mask": jnp.ones((3, 5))})
    with pytest.raises(ValueError, match="'input_ids' entry"):
        loss(table, {"ids": jnp.zeros((3, 4), jnp.int32)})
    with pytest.raises(ValueError, match=r"logits shaped \(batch, seq, vocab\)"):
        so.causal_lm_loss(lambda w, ids: w)(table, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        so.causal_lm_loss("model")


# ---------------------------------------------------------------------------
# Token data and the LLC


VOCAB, N, SEQ = 8, 60, 12
BIGRAM_KW = dict(nbeta=50.0, learning_rate=1e-3, localization=10.0,
                 num_chains=2, num_draws=30, batch_size=8, progress=False)


def bigram(table, ids):
    """Logits from the current token alone: a (vocab, vocab) table."""
    return table[ids]


def bigram_problem(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (N, SEQ))
    counts = np.ones((VOCAB, VOCAB))
    np.add.at(counts, (tokens[:, :-1], tokens[:, 1:]), 1)
    table = np.log(counts / counts.sum(1, keepdims=True)).astype(np.float32)
    return tokens, table


def test_token_data_from_every_source_gives_the_same_llc():
    """A NumPy array, a torch tensor, a torch DataLoader (of a
    TensorDataset, and of a tokenized HF dataset), a Hugging Face
    `datasets.Dataset` and a dict of lists are read into the same arrays,
    so the LLC with the same key is the same, to the bit."""
    tokens, table = bigram_problem()
    hf = datasets.Dataset.from_dict({
        "text": [" ".join(map(str, row)) for row in tokens],
        "input_ids": tokens.tolist()})
    sources = {
        "numpy": tokens,
        "torch": torch.as_tensor(tokens),
        "dataloader": torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.as_tensor(tokens)),
            batch_size=7),                    # a short last batch too
        "hf_dataset": hf,
        "hf_dataloader": torch.utils.data.DataLoader(
            hf.with_format("torch", columns=["input_ids"]), batch_size=16),
        "dict_of_lists": {"input_ids": tokens.tolist()},
    }
    loss_fn = so.causal_lm_loss(bigram)
    results = {}
    for name, source in sources.items():
        data = so.token_data(source)
        assert set(data) == {"input_ids"}, name
        assert data["input_ids"].dtype == np.int32, name
        np.testing.assert_array_equal(data["input_ids"], tokens, err_msg=name)
        results[name] = so.estimate_llc(loss_fn, table, data, key=3,
                                        **BIGRAM_KW)
    want = results["numpy"]
    assert np.isfinite(want.llc_mean) and not np.any(want.diverged)
    for name, result in results.items():
        np.testing.assert_array_equal(result.loss_trace, want.loss_trace,
                                      err_msg=name)
        assert result.llc_mean == want.llc_mean, name
    # A different key, a different estimate: the sources did not all give
    # some constant.
    other = so.estimate_llc(loss_fn, table, so.token_data(tokens), key=4,
                            **BIGRAM_KW)
    assert other.llc_mean != want.llc_mean


def test_token_data_masks_and_padding():
    """The attention mask is carried from every source; ragged sequences are
    right-padded with pad_id and masked; the estimate uses the mask (the
    loss at w* is the masked mean of the oracle)."""
    tokens, table = bigram_problem(1)
    rng = np.random.default_rng(2)
    lengths = rng.integers(2, SEQ + 1, N)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    ragged = [row[:k].tolist() for row, k in zip(tokens, lengths)]
    padded = np.where(mask == 1, tokens, 0)

    hf = datasets.Dataset.from_dict({"input_ids": padded.tolist(),
                                     "attention_mask": mask.tolist()})
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.as_tensor(padded),
                                       torch.as_tensor(mask)), batch_size=9)
    for source in (hf, loader, {"input_ids": padded, "attention_mask": mask},
                   {"input_ids": ragged},
                   datasets.Dataset.from_dict({"input_ids": ragged})):
        data = so.token_data(source, pad_id=0)
        np.testing.assert_array_equal(data["input_ids"], padded)
        np.testing.assert_array_equal(data["attention_mask"], mask)
        assert data["attention_mask"].dtype == np.int32

    # A source mask with holes is combined with the padding's.
    holes = [[1] * (k - 1) + [0] for k in lengths]
    data = so.token_data({"input_ids": ragged, "attention_mask": holes},
                         pad_id=0)
    want = mask.copy()
    want[np.arange(N), lengths - 1] = 0
    np.testing.assert_array_equal(data["attention_mask"], want)

    # L_n(w*), and the first draw's loss (at w*, on all n sequences): the
    # masked mean over every sequence.
    data = so.token_data({"input_ids": ragged}, pad_id=0)
    result = so.estimate_llc(so.causal_lm_loss(bigram), table, data, key=0,
                             **{**BIGRAM_KW, "batch_size": N, "num_draws": 1})
    want = _oracle_loss(np.asarray(table)[padded], padded, mask)
    np.testing.assert_allclose(result.init_loss, want, rtol=1e-5)
    np.testing.assert_allclose(result.loss_trace[:, 0], want, rtol=1e-5)


def test_token_data_errors():
    tokens, _ = bigram_problem()
    with pytest.raises(ValueError, match="different lengths.*pad_id"):
        so.token_data({"input_ids": [[1, 2, 3], [4, 5]]})
    with pytest.raises(ValueError, match="different lengths"):
        so.token_data(datasets.Dataset.from_dict(
            {"input_ids": [[1, 2, 3], [4, 5]]}))
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        so.token_data(datasets.Dataset.from_dict({"text": ["a b", "c"]}))
    with pytest.raises(ValueError, match="no 'input_ids' entry"):
        so.token_data([{"ids": tokens}])
    with pytest.raises(TypeError, match="tokenize it first"):
        so.token_data("some text")
    with pytest.raises(TypeError, match="source must be"):
        so.token_data(3)
    with pytest.raises(ValueError, match="integer token ids"):
        so.token_data(np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"\(n, seq\)"):
        so.token_data(np.arange(5))
    with pytest.raises(ValueError, match="outside the range of int32"):
        so.token_data(np.array([[1, 2 ** 40]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        so.token_data({"input_ids": tokens, "attention_mask": tokens[:, 1:]})
    with pytest.raises(ValueError, match="no batches"):
        so.token_data(iter([]))


def test_equal_losses_share_the_compiled_program():
    """`causal_lm_loss(f)` built twice compares equal, so the second
    estimate_llc call does not trace the model again."""
    tokens, table = bigram_problem()
    traces = []

    def counting(table, ids):
        traces.append(ids.shape)
        return table[ids]

    assert so.causal_lm_loss(counting) == so.causal_lm_loss(counting)
    assert hash(so.causal_lm_loss(counting)) == hash(so.causal_lm_loss(counting))
    assert so.causal_lm_loss(counting) != so.causal_lm_loss(
        counting, pass_attention_mask=True)
    assert so.causal_lm_loss(counting) != so.causal_lm_loss(bigram)
    data = so.token_data(tokens)
    so.estimate_llc(so.causal_lm_loss(counting), table, data, key=0,
                    **BIGRAM_KW)
    after_first = len(traces)
    assert after_first > 0
    so.estimate_llc(so.causal_lm_loss(counting), table * 1.01, data, key=1,
                    **{**BIGRAM_KW, "learning_rate": 2e-3})
    assert len(traces) == after_first


# ---------------------------------------------------------------------------
# Against devinterp's llc() on the example's GPT-2


def test_gpt2_llc_agrees_with_devinterps_llc(tmp_path):
    """The example's GPT-2, trained briefly and saved as a torch checkpoint:
    `estimate_llc` on the Flax model read from the file, and devinterp's
    `llc()` on the `GPT2LMHeadModel` loaded from it, with the same
    hyperparameters, no burn-in, and batches of 8 sequences.

    devinterp averages the loss at every step, from the first at w* on, as
    the draws here do; with 800 sequences, one pass covers the 100 steps, so
    neither repeats a batch within a chain and the two minibatch orders
    (devinterp's replays its first pass) have the same law. Its chains are
    independent here (`match_sampling_input_ids_across_chains=False`).
    L_n(w*) is over the whole data on both sides and agrees to 1e-5; the
    LLCs agree within 3.5 standard errors of their difference, from the
    pooled spread of the 4 + 16 chains. (A doubled nbeta or learning rate,
    or a halved localization, on one side moves the difference by more than
    10 of them.)"""
    pytest.importorskip("devinterp.slt.llc")
    from devinterp.slt.llc import llc
    from safetensors.torch import load_file

    config = gpt2.GPT2Config()
    n, batch, draws = 800, 8, 100
    tokens, _ = gpt2.markov_sequences(n, 64, config.vocab_size, seed=1)
    data = so.token_data(tokens)
    apply_fn = gpt2.make_apply(config)
    loss_fn = so.causal_lm_loss(apply_fn)
    rules = ti.gpt2_rules()
    like = gpt2.template(config)
    model = gpt2.torch_model(config, seed=1)
    params = ti.params_from_torch(model, like=like, rules=rules)
    _, saved = gpt2.train(loss_fn, params, data, 150, {150}, seed=1)
    path = ti.save_torch_checkpoint(saved[150], tmp_path / "gpt2.safetensors",
                                    like=model, rules=rules)

    hp = dict(gpt2.LLC, batch_size=batch, num_burnin_steps=0)
    ours = so.estimate_llc(
        loss_fn, ti.params_from_torch(path, like=like, rules=rules), data,
        key=0, num_chains=16, num_draws=draws, progress=False, **hp)

    model.load_state_dict(load_file(path), strict=True)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": tokens.astype(np.int64)}).with_format("torch")
    theirs = llc(model, dataset, {}, lr=hp["learning_rate"],
                 n_beta=hp["nbeta"], localization=hp["localization"],
                 num_chains=4, num_draws=draws, batch_size=batch,
                 num_burnin_steps=0, num_init_loss_batches=n // batch,
                 match_sampling_input_ids_across_chains=False,
                 output_path=str(tmp_path / "devinterp.zarr"))

    np.testing.assert_allclose(ours.init_loss, float(theirs.init_loss),
                               rtol=1e-5)
    assert not np.any(ours.diverged)
    a = np.asarray(theirs.llc_per_chain, np.float64)
    b = np.asarray(ours.llc_per_chain, np.float64)
    assert np.all(np.isfinite(a)) and a.shape == (4,)
    pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1))
                     / (a.size + b.size - 2))
    se = pooled * np.sqrt(1 / a.size + 1 / b.size)
    assert abs(a.mean() - b.mean()) < 3.5 * se, (a, b)
    # Both are far from 0 and from d / 2: the comparison is not vacuous.
    d = gpt2.num_params(params)
    assert 5 * se < b.mean() < d / 20


def test_a_hugging_face_dataset_is_pointed_to_token_data():
    datasets = pytest.importorskip("datasets")
    ids = np.zeros((8, 5), np.int32)
    dataset = datasets.Dataset.from_dict({"input_ids": ids})
    with pytest.raises(TypeError, match="token_data"):
        so.estimate_llc(lambda p, b: jnp.sum(p), jnp.ones(2), dataset,
                        learning_rate=1e-4, nbeta=10.0)
