"""Conversion rules for real architectures: GPT-2, Llama and BERT from
transformers, against the PyTorch models themselves.

Every model is built from a tiny config with random weights (no downloads).
Each Flax model below is an independent implementation of its architecture,
named as the Hugging Face module tree; its outputs are compared with
transformers' to 1e-5, and the round trip back to a state dict is compared
bit for bit with the original.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import sgld_optax as so  # noqa: E402
from sgld_optax import torch_interop as ti  # noqa: E402

VOCAB, POS, EMBD, HEADS, LAYERS = 64, 32, 32, 4, 2
BATCH, SEQ = 2, 12
TOL = dict(rtol=1e-5, atol=1e-5)


def randomize(model, std=0.2, seed=0):
    """Weights of order one (the default initialisation makes attention
    nearly uniform and the norms trivial, which would hide layout errors);
    the 1-D weights, those of the norms, around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(noise + 1.0 if p.ndim == 1 and name.endswith("weight")
                    else noise)
    return model.eval()


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ))


def assert_state_dicts_bitwise_equal(got, want):
    assert list(got) == list(want)
    for name, a in want.items():
        b = got[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert torch.equal(a.contiguous().view(torch.int32),
                           b.contiguous().view(torch.int32)), name


def round_trip_into_fresh_model(make_model, params, rules, original):
    """params -> state dict -> a freshly built model (strict), bitwise."""
    fresh = make_model()
    sd = ti.params_to_torch(params, like=fresh, rules=rules)
    fresh.load_state_dict(sd, strict=True)
    assert_state_dicts_bitwise_equal(fresh.state_dict(), original.state_dict())


# ---------------------------------------------------------------------------
# GPT-2 (flax.linen), named as GPT2LMHeadModel
# ---------------------------------------------------------------------------


def gpt2_model(seed=0):
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=EMBD, n_head=HEADS, vocab_size=VOCAB,
        n_positions=POS, attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize(transformers.GPT2LMHeadModel(config), seed=seed)


class FusedSelfAttention(nn.Module):
    """GPT-2's attention with a fused query-key-value projection `c_attn`."""

    num_heads: int

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = jnp.split(nn.Dense(3 * d, name="c_attn")(x), 3, axis=-1)
        heads = lambda a: a.reshape(b, t, self.num_heads, d // self.num_heads)
        out = nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask)
        return nn.Dense(d, name="c_proj")(out.reshape(b, t, d))


class GPT2MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.gelu(nn.Dense(4 * d, name="c_fc")(x), approximate=True)
        return nn.Dense(d, name="c_proj")(h)


class GPT2Block(nn.Module):
    num_heads: int
    multi_head: bool   # flax's MultiHeadDotProductAttention, or fused

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
        if self.multi_head:
            attn = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                                   name="attn")
            x = x + attn(h, mask=mask)
        else:
            x = x + FusedSelfAttention(self.num_heads, name="attn")(h, mask)
        h = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
        return x + GPT2MLP(name="mlp")(h)


class GPT2Transformer(nn.Module):
    multi_head: bool

    @nn.compact
    def __call__(self, ids):
        wte = nn.Embed(VOCAB, EMBD, name="wte")
        x = wte(ids) + nn.Embed(POS, EMBD, name="wpe")(jnp.arange(ids.shape[1]))
        mask = nn.make_causal_mask(ids)
        for i in range(LAYERS):
            x = GPT2Block(HEADS, self.multi_head, name=f"h_{i}")(x, mask)
        return wte.attend(nn.LayerNorm(epsilon=1e-5, name="ln_f")(x))


class GPT2LM(nn.Module):
    multi_head: bool = False

    @nn.compact
    def __call__(self, ids):
        return GPT2Transformer(self.multi_head, name="transformer")(ids)


def gpt2_template(multi_head=False):
    return GPT2LM(multi_head).init(jax.random.key(0),
                                   jnp.zeros((1, SEQ), jnp.int32))["params"]


def gpt2_logits(params, ids, multi_head=False):
    fn = jax.jit(lambda p, x: GPT2LM(multi_head).apply({"params": p}, x))
    return np.asarray(fn(params, ids))


def torch_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("multi_head", [False, True],
                         ids=["fused_c_attn", "multi_head_attention"])
def test_gpt2_logits_and_round_trip(multi_head):
    model = gpt2_model()
    rules = ti.gpt2_rules(num_heads=HEADS if multi_head else None)
    like = gpt2_template(multi_head)
    params = ti.params_from_torch(model.state_dict(), like=like, rules=rules)
    assert jax.tree.structure(params) == jax.tree.structure(like)
    attn = params["transformer"]["h_0"]["attn"]
    if multi_head:   # c_attn split three ways, each (d, heads, d / heads)
        assert attn["key"]["kernel"].shape == (EMBD, HEADS, EMBD // HEADS)
        assert attn["out"]["kernel"].shape == (HEADS, EMBD // HEADS, EMBD)
    ids = tokens()
    np.testing.assert_allclose(gpt2_logits(params, ids, multi_head),
                               torch_logits(model, ids), **TOL)
    round_trip_into_fresh_model(lambda: gpt2_model(seed=1), params, rules,
                                model)


def test_gpt2_square_conv1d_weight_is_never_transposed():
    """GPT-2's attn.c_proj is a square Conv1D weight stored (in, out): a
    conversion that transposes it, as a Linear weight would be, is wrong
    while every shape still fits."""
    model = gpt2_model()
    like, ids = gpt2_template(), tokens()
    want = torch_logits(model, ids)
    assert model.transformer.h[0].attn.c_proj.weight.shape == (EMBD, EMBD)

    # What reading every 2-D kernel as an nn.Linear weight does to c_proj.
    linear_c_proj = ti.Rule(r"transformer\.h\.(\d+)\.attn\.c_proj\.weight",
                            r"transformer/h_\1/attn/c_proj/kernel", "transpose")
    wrong = ti.params_from_torch(model.state_dict(), like=like,
                                 rules=[linear_c_proj, *ti.gpt2_rules()])
    assert np.max(np.abs(gpt2_logits(wrong, ids) - want)) > 1e-2

    # The module types decide when the module itself is given: Conv1D
    # weights are kept, square or not; only the tied head needs a rule.
    tied = ti.Rule(r"lm_head\.weight", "transformer/wte/embedding")
    params = ti.params_from_torch(model, like=like, rules=[tied])
    np.testing.assert_allclose(gpt2_logits(params, ids), want, **TOL)
    c_proj = model.transformer.h[1].attn.c_proj.weight.detach().numpy()
    np.testing.assert_array_equal(
        params["transformer"]["h_1"]["attn"]["c_proj"]["kernel"], c_proj)
    round_trip_into_fresh_model(lambda: gpt2_model(seed=1), params, [tied],
                                model)

    # A bare state dict carries no module types: its 2-D kernels are read
    # as nn.Linear weights, which the non-square Conv1D weights cannot be;
    # the error names them and the square ones, and points to the rules.
    with pytest.raises(ti.CheckpointMismatchError) as info:
        ti.params_from_torch(model.state_dict(), like=like)
    err = info.value
    mismatched = {m[0] for m in err.mismatched}
    assert mismatched == {f"transformer.h.{i}.{n}.weight" for i in range(LAYERS)
                          for n in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")}
    assert [u[0] for u in err.unexpected] == ["lm_head.weight"]
    message = str(err)
    assert "gpt2_rules()" in message
    assert ("square weights transformer.h.0.attn.c_proj.weight, "
            "transformer.h.1.attn.c_proj.weight") in message


def test_gpt2_buffers_of_older_checkpoints_are_dropped_and_restored():
    """Older GPT-2 checkpoints also hold the causal mask `attn.bias` and
    `attn.masked_bias`: the rules drop them, and writing copies them from
    the template."""
    model = gpt2_model()
    sd = dict(model.state_dict())
    for i in range(LAYERS):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(
            torch.ones(POS, POS, dtype=torch.bool)).view(1, 1, POS, POS)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    like, ids = gpt2_template(), tokens()
    params = ti.params_from_torch(sd, like=like, rules=ti.gpt2_rules())
    np.testing.assert_allclose(gpt2_logits(params, ids),
                               torch_logits(model, ids), **TOL)
    back = ti.params_to_torch(params, like=sd, rules=ti.gpt2_rules())
    assert list(back) == list(sd)
    for name, t in sd.items():
        assert torch.equal(back[name], t), name
    # Without the rule that drops them, they are left over.
    keep_buffers = [r for r in ti.gpt2_rules() if r.target is not None]
    with pytest.raises(ti.CheckpointMismatchError) as info:
        ti.params_from_torch(sd, like=like, rules=keep_buffers)
    buffers = [n for n in sd if n.endswith((".attn.bias", ".attn.masked_bias"))]
    assert len(buffers) == 2 * LAYERS
    assert sorted(u[0] for u in info.value.unexpected) == sorted(buffers)


def test_every_problem_is_listed_in_one_error():
    model = gpt2_model()
    rules = ti.gpt2_rules(num_heads=HEADS)
    like = gpt2_template(multi_head=True)
    like = jax.tree.map(lambda x: x, like)   # a copy to edit
    tr = like["transformer"]
    tr["h_0"]["mlp"]["gate"] = {"kernel": jnp.zeros(3)}           # unmatched
    del tr["ln_f"]["bias"]                           # a rule's target is gone
    tr["h_1"]["mlp"]["c_fc"]["kernel"] = jnp.zeros((EMBD, 3 * EMBD))  # shape
    tr["h_1"]["attn"]["query"]["kernel"] = jnp.zeros((EMBD, 3, 8))  # heads
    sd = dict(model.state_dict())
    sd["extra.weight"] = torch.zeros(2, 2)                        # unused
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0             # untied
    with pytest.raises(ti.CheckpointMismatchError) as info:
        ti.params_from_torch(sd, like=like, rules=rules)
    err = info.value
    assert err.missing == [("transformer/h_0/mlp/gate/kernel", (3,))]
    assert err.unexpected == [
        ("extra.weight", (2, 2)),
        ("transformer.ln_f.bias", (EMBD,),
         "its rule's target transformer/ln_f/bias is not in like")]
    assert sorted((m[0], m[1]) for m in err.mismatched) == [
        ("transformer.h.1.attn.c_attn.weight", "transformer/h_1/attn/query/kernel"),
        ("transformer.h.1.mlp.c_fc.weight", "transformer/h_1/mlp/c_fc/kernel")]
    assert err.other == ["tied tensors differ: transformer.wte.weight and "
                         "lm_head.weight both go to transformer/wte/embedding"]
    assert str(err).count("\n  ") == 6

    # A rule whose target is not in the template, and the other direction.
    params = ti.params_from_torch(model, like=gpt2_template(True), rules=rules)
    params["transformer"]["h_0"]["mlp"]["extra"] = {"kernel": jnp.zeros(3)}
    del params["transformer"]["wpe"]
    with pytest.raises(ti.CheckpointMismatchError) as info:
        ti.params_to_torch(params, like=model, rules=rules)
    err = info.value
    assert [m[0] for m in err.missing] == ["transformer.wpe.weight"]
    assert "not in params" in err.missing[0][2]
    assert err.unexpected == [("transformer/h_0/mlp/extra/kernel", (3,))]
    with pytest.raises(TypeError, match="like="):
        ti.params_to_torch(params, rules=rules)


# ---------------------------------------------------------------------------
# Llama (flax.nnx, multi-head kernels, grouped-query attention)
# ---------------------------------------------------------------------------

KV_HEADS = 2


def llama_model(seed=0):
    config = transformers.LlamaConfig(
        hidden_size=EMBD, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB, max_position_embeddings=POS, rms_norm_eps=1e-6,
        attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize(transformers.LlamaForCausalLM(config), seed=seed)


def rotary(x, theta=10000.0):
    """Rotary position embedding on (batch, seq, heads, head_dim), with the
    halves rotated as in transformers' `rotate_half`."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    freqs = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * jnp.cos(emb) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(emb)


class LlamaAttention(nnx.Module):
    def __init__(self, rngs):
        hd = EMBD // HEADS
        self.q_proj = nnx.LinearGeneral(EMBD, (HEADS, hd), use_bias=False,
                                        rngs=rngs)
        self.k_proj = nnx.LinearGeneral(EMBD, (KV_HEADS, hd), use_bias=False,
                                        rngs=rngs)
        self.v_proj = nnx.LinearGeneral(EMBD, (KV_HEADS, hd), use_bias=False,
                                        rngs=rngs)
        self.o_proj = nnx.LinearGeneral((HEADS, hd), EMBD, axis=(-2, -1),
                                        use_bias=False, rngs=rngs)

    def __call__(self, x):
        q, k, v = rotary(self.q_proj(x)), rotary(self.k_proj(x)), self.v_proj(x)
        rep = HEADS // KV_HEADS
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        t = x.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.o_proj(out)


class LlamaMLP(nnx.Module):
    def __init__(self, rngs):
        self.gate_proj = nnx.Linear(EMBD, 48, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(EMBD, 48, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(48, EMBD, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nnx.Module):
    def __init__(self, rngs):
        self.input_layernorm = nnx.RMSNorm(EMBD, epsilon=1e-6, rngs=rngs)
        self.self_attn = LlamaAttention(rngs)
        self.post_attention_layernorm = nnx.RMSNorm(EMBD, epsilon=1e-6,
                                                    rngs=rngs)
        self.mlp = LlamaMLP(rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(VOCAB, EMBD, rngs=rngs)
        self.layers = nnx.List([LlamaLayer(rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(EMBD, epsilon=1e-6, rngs=rngs)

    def __call__(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, rngs):
        self.model = LlamaModel(rngs)
        self.lm_head = nnx.Linear(EMBD, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        return self.lm_head(self.model(ids))


def test_llama_logits_and_round_trip():
    model = llama_model()
    rules = ti.llama_rules(num_heads=HEADS, num_kv_heads=KV_HEADS)
    flax_model = LlamaForCausalLM(nnx.Rngs(0))
    graphdef, state = nnx.split(flax_model)
    like = nnx.to_pure_dict(state)   # layers/0/... : indices as keys
    params = ti.params_from_torch(model, like=like, rules=rules)
    attn = params["model"]["layers"][1]["self_attn"]
    assert attn["k_proj"]["kernel"].shape == (EMBD, KV_HEADS, EMBD // HEADS)
    assert attn["o_proj"]["kernel"].shape == (HEADS, EMBD // HEADS, EMBD)
    nnx.replace_by_pure_dict(state, params)

    @jax.jit
    def logits(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = tokens(1)
    np.testing.assert_allclose(np.asarray(logits(state, ids)),
                               torch_logits(model, ids), **TOL)
    round_trip_into_fresh_model(lambda: llama_model(seed=1), params, rules,
                                model)

    # Without num_heads the projections stay 2-D: nn.Linear weights, transposed.
    flat = ti.params_from_torch(model.state_dict(), rules=ti.llama_rules())
    k_proj = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    got = flat["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(got, k_proj.T)
    np.testing.assert_array_equal(
        np.asarray(params["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"]),
        k_proj.T.reshape(EMBD, KV_HEADS, -1))


def test_llama_tied_embeddings_and_files(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=EMBD, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=HEADS, vocab_size=VOCAB, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config))
    rules = ti.llama_rules(tie_word_embeddings=True)
    params = ti.params_from_torch(model, rules=rules)
    assert "lm_head" not in params
    embedding = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(params["model"]["embed_tokens"]["embedding"],
                                  embedding)
    sd = ti.params_to_torch(params, like=model, rules=rules)
    assert torch.equal(sd["lm_head.weight"], model.lm_head.weight)
    assert_state_dicts_bitwise_equal(sd, model.state_dict())

    # The module types alone name and lay out everything else the same way;
    # one rule ties the head to the embedding.
    tie = ti.Rule(r"lm_head\.weight", "model/embed_tokens/embedding")
    by_types = ti.params_from_torch(model, rules=[tie])
    assert jax.tree.structure(by_types) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, by_types, params)

    # Files: written with the rules, read back without torch's help.
    path = ti.save_torch_checkpoint(params, tmp_path / "llama.safetensors",
                                    like=model, rules=rules)
    from safetensors.torch import load_file
    assert_state_dicts_bitwise_equal(
        {n: load_file(path)[n] for n in model.state_dict()}, model.state_dict())
    again = ti.params_from_torch(path, rules=rules)
    jax.tree.map(np.testing.assert_array_equal, again, params)


# ---------------------------------------------------------------------------
# BERT (flax.linen), named as BertModel
# ---------------------------------------------------------------------------


def bert_model(seed=0):
    config = transformers.BertConfig(
        hidden_size=EMBD, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=POS,
        attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize(transformers.BertModel(config), seed=seed)


def layer_norm(name):
    return nn.LayerNorm(epsilon=1e-12, name=name)


class BertSelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        heads = lambda a: a.reshape(b, t, HEADS, d // HEADS)
        q, k, v = (heads(nn.Dense(d, name=n)(x)) for n in ("query", "key", "value"))
        return nn.dot_product_attention(q, k, v, mask=mask).reshape(b, t, d)


class BertDenseNorm(nn.Module):
    """`dense` then `LayerNorm` of the sum with the residual."""

    @nn.compact
    def __call__(self, x, residual):
        return layer_norm("LayerNorm")(
            nn.Dense(residual.shape[-1], name="dense")(x) + residual)


class BertAttention(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return BertDenseNorm(name="output")(
            BertSelfAttention(name="self")(x, mask), x)


class BertIntermediate(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.gelu(nn.Dense(48, name="dense")(x), approximate=False)


class BertLayer(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        a = BertAttention(name="attention")(x, mask)
        return BertDenseNorm(name="output")(BertIntermediate(name="intermediate")(a), a)


class BertEncoder(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        for i in range(LAYERS):
            x = BertLayer(name=f"layer_{i}")(x, mask)
        return x


class BertEmbeddings(nn.Module):
    @nn.compact
    def __call__(self, ids, token_types):
        x = (nn.Embed(VOCAB, EMBD, name="word_embeddings")(ids)
             + nn.Embed(POS, EMBD, name="position_embeddings")(
                 jnp.arange(ids.shape[1]))
             + nn.Embed(2, EMBD, name="token_type_embeddings")(token_types))
        return layer_norm("LayerNorm")(x)


class BertPooler(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(EMBD, name="dense")(x[:, 0]))


class Bert(nn.Module):
    @nn.compact
    def __call__(self, ids, token_types, attention_mask):
        mask = nn.make_attention_mask(jnp.ones_like(ids), attention_mask)
        x = BertEmbeddings(name="embeddings")(ids, token_types)
        x = BertEncoder(name="encoder")(x, mask)
        return x, BertPooler(name="pooler")(x)


def test_bert_hidden_states_and_round_trip():
    model = bert_model()
    ids = tokens(2)
    token_types = (np.arange(SEQ) >= SEQ // 2).astype(np.int64)[None].repeat(BATCH, 0)
    attention_mask = np.ones((BATCH, SEQ), np.int64)
    attention_mask[1, -4:] = 0   # padding in the second sequence
    like = Bert().init(jax.random.key(0), ids, token_types,
                       attention_mask)["params"]
    params = ti.params_from_torch(model.state_dict(), like=like,
                                  rules=ti.bert_rules())
    hidden, pooled = jax.jit(Bert().apply)({"params": params}, ids,
                                           token_types, attention_mask)
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(
            attention_mask), token_type_ids=torch.as_tensor(token_types))
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(),
                               **TOL)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(),
                               **TOL)
    round_trip_into_fresh_model(lambda: bert_model(seed=1), params,
                                ti.bert_rules(), model)


def test_bert_rules_with_heads_and_a_prefix():
    """`bert.` prefixes (BertFor... models) and multi-head kernels."""
    model = bert_model()
    sd = {f"bert.{n}": t for n, t in model.state_dict().items()}
    sd["bert.embeddings.position_ids"] = torch.arange(POS)[None]   # a buffer
    rules = ti.bert_rules(num_heads=HEADS)
    params = ti.params_from_torch(sd, rules=rules)
    attention = params["bert"]["encoder"]["layer_1"]["attention"]
    w = model.encoder.layer[1].attention.self.value.weight.detach().numpy()
    hd = EMBD // HEADS
    np.testing.assert_array_equal(attention["self"]["value"]["kernel"],
                                  w.T.reshape(EMBD, HEADS, hd))
    b = model.encoder.layer[1].attention.self.value.bias.detach().numpy()
    np.testing.assert_array_equal(attention["self"]["value"]["bias"],
                                  b.reshape(HEADS, hd))
    w = model.encoder.layer[1].attention.output.dense.weight.detach().numpy()
    np.testing.assert_array_equal(attention["output"]["dense"]["kernel"],
                                  w.T.reshape(HEADS, hd, EMBD))
    back = ti.params_to_torch(params, like=sd, rules=rules)
    assert list(back) == list(sd)
    for name, t in sd.items():
        assert torch.equal(back[name], t), name


# ---------------------------------------------------------------------------
# Rules and layouts themselves
# ---------------------------------------------------------------------------


def test_layouts_against_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 12)).astype(np.float32)
    cases = [
        (ti.Layout(), 1, [w]),
        (ti.Layout(transpose=True), 1, [w.T]),
        (ti.Layout(split=1), 3, [w[:, :4], w[:, 4:8], w[:, 8:]]),
        (ti.Layout(split=(1, (6, 3, 3))), 3, [w[:, :6], w[:, 6:9], w[:, 9:]]),
        (ti.Layout(transpose=True, unflatten=(1, (-1, 2))), 1,
         [w.T.reshape(12, 3, 2)]),
        (ti.Layout(split=0, transpose=True, unflatten=(0, (3, 4))), 3,
         [w[i:i + 2].T.reshape(3, 4, 2) for i in (0, 2, 4)]),
    ]
    for k, (layout, n, want) in enumerate(cases):
        targets = [f"t{i}/kernel" for i in range(n)]
        rule = ti.Rule(r"w", targets if n > 1 else targets[0], layout)
        params = ti.params_from_torch({"w": w}, rules=[rule])
        for t, expected in zip(targets, want):
            np.testing.assert_array_equal(params[t.split("/")[0]]["kernel"],
                                          expected, err_msg=str(k))
        back = ti.params_to_torch(params, like={"w": w}, rules=[rule])
        np.testing.assert_array_equal(back["w"].numpy(), w, err_msg=str(k))
    conv = rng.normal(size=(8, 3, 5, 2)).astype(np.float32)   # (O, I, H, W)
    params = ti.params_from_torch({"c": conv}, rules=[ti.Rule("c", "k", "conv")])
    np.testing.assert_array_equal(params["k"], conv.transpose(2, 3, 1, 0))


def test_rules_are_tried_in_order_and_checked():
    sd = {"a.weight": np.ones((2, 3), np.float32),
          "b.weight": np.ones((2, 3), np.float32)}
    rules = [ti.Rule(r"a\.weight", "first/kernel"),
             ti.Rule(r"(\w)\.weight", r"\1/kernel", "transpose")]
    params = ti.params_from_torch(sd, rules=rules)
    assert params["first"]["kernel"].shape == (2, 3)
    assert params["b"]["kernel"].shape == (3, 2)
    with pytest.raises(ValueError, match="split"):
        ti.Rule("x", ["a", "b"])
    with pytest.raises(ValueError, match="parts"):
        ti.Rule("x", ["a", "b", "c"], ti.Layout(split=(0, (1, 2))))
    with pytest.raises(ValueError, match="pattern"):
        ti.Rule("(", "a")
    with pytest.raises(ValueError, match="transpose"):
        ti.Layout(transpose=(0, 0))
    with pytest.raises(TypeError, match="Rule"):
        ti.params_from_torch(sd, rules=[("a", "b")])
    with pytest.raises(ti.CheckpointMismatchError, match="does not split"):
        ti.params_from_torch({"x": np.ones((2, 5), np.float32)},
                             rules=[ti.Rule("x", ["p", "q"], ti.Layout(split=1))])


def test_unknown_module_types_need_a_rule():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 3))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = Custom()
            self.fc = torch.nn.Linear(3, 3)

    net = Net()
    like = {"mix": {"kernel": jnp.zeros((3, 3))},
            "fc": {"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros(3)}}
    with pytest.raises(ti.CheckpointMismatchError, match="layout undecided: "
                       "mix.weight") as info:
        ti.params_from_torch(net, like=like)
    assert len(info.value.other) == 1   # fc is an nn.Linear: decided
    keep = [ti.Rule(r"mix\.weight", "mix/kernel", "keep")]
    params = ti.params_from_torch(net, like=like, rules=keep)
    np.testing.assert_array_equal(params["mix"]["kernel"],
                                  net.mix.weight.detach().numpy())
    np.testing.assert_array_equal(params["fc"]["kernel"],
                                  net.fc.weight.detach().numpy().T)


def test_devinterp_pairing_follows_the_module_types():
    """Moving sampler state for GPT-2 keeps its Conv1D weights as they are
    (the square attn.c_proj included)."""
    model = gpt2_model()
    params = ti.params_from_torch(model, rules=ti.gpt2_rules())
    tx = so.sgld(1e-4, nbeta=10.0, localization=1.0, key=0)
    exported = ti.sgld_state_to_torch(tx.init(params), tx, module=model)
    names = [n for n, _ in model.named_parameters()]
    assert len(exported["state"]) == len(names)
    for i, (name, p) in enumerate(model.named_parameters()):
        assert torch.equal(exported["state"][i]["initial_param"], p), name
