"""A GPT-2 from PyTorch, trained on a synthetic token task, and its LLC over training.

1. Build a Hugging Face ``GPT2LMHeadModel`` from a tiny config (random
   weights, nothing downloaded) and load it into a Flax GPT-2 whose module
   tree is named as Hugging Face's (``transformer/h_0/attn/c_attn``, ...),
   with ``torch_interop.params_from_torch(..., rules=gpt2_rules())``; both
   give the same logits.
2. Train the Flax model briefly with Adam on sequences of a random Markov
   chain (each token has a few likely successors), saving a series of
   checkpoints as PyTorch ``.safetensors`` files, which
   ``GPT2LMHeadModel.load_state_dict`` (or devinterp) reads.
3. Estimate the local learning coefficient at every checkpoint with one
   ``so.estimate_llc_series(so.causal_lm_loss(apply_fn), paths, ...,
   like=..., rules=gpt2_rules())`` call, which reads the files back and
   samples the chains of the checkpoints together in one compiled program,
   on the training sequences, in minibatches of 8 sequences of 64 tokens.
4. Plot the training loss and the LLC against the training step.

    python examples/gpt2_llc.py                     # about 30 s on 2 CPU cores
    python examples/gpt2_llc.py --train-steps 2000 --checkpoints 8 \\
        --num-draws 1000 --n-embd 64 --n-layer 4

It needs the ``torch`` extra and ``transformers``.
"""

import argparse
import os
import pathlib
import time
from typing import NamedTuple, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sgld_optax as so  # noqa: E402
from sgld_optax import torch_interop  # noqa: E402


# ---------------------------------------------------------------------------
# The model: GPT-2 in Flax, its modules named as GPT2LMHeadModel's.


class GPT2Config(NamedTuple):
    """The fields of `transformers.GPT2Config` the model uses."""

    vocab_size: int = 32
    n_positions: int = 64
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 2
    layer_norm_epsilon: float = 1e-5

    def to_hf(self):
        """The `transformers.GPT2Config`, without dropout: the model is the
        same function in training and evaluation mode."""
        import transformers

        return transformers.GPT2Config(
            **self._asdict(), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attn_implementation="eager")


class Attention(nn.Module):
    """Causal self-attention with GPT-2's fused query-key-value `c_attn`
    (a `Conv1D`, `x @ W + b` with `W` stored `(in, out)`, which is what
    `nn.Dense` computes with the same kernel)."""

    num_heads: int

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = jnp.split(nn.Dense(3 * d, name="c_attn")(x), 3, axis=-1)
        heads = lambda a: a.reshape(b, t, self.num_heads, d // self.num_heads)
        out = nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask)
        return nn.Dense(d, name="c_proj")(out.reshape(b, t, d))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.gelu(nn.Dense(4 * d, name="c_fc")(x), approximate=True)
        return nn.Dense(d, name="c_proj")(h)


class Block(nn.Module):
    num_heads: int
    eps: float

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(epsilon=self.eps, name="ln_1")(x)
        x = x + Attention(self.num_heads, name="attn")(h, mask)
        h = nn.LayerNorm(epsilon=self.eps, name="ln_2")(x)
        return x + MLP(name="mlp")(h)


class Transformer(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        c = self.config
        wte = nn.Embed(c.vocab_size, c.n_embd, name="wte")
        wpe = nn.Embed(c.n_positions, c.n_embd, name="wpe")
        x = wte(ids) + wpe(jnp.arange(ids.shape[1]))
        mask = nn.make_causal_mask(ids)
        if attention_mask is not None:  # padded keys are not attended to
            mask = nn.combine_masks(
                mask, attention_mask[:, None, None, :].astype(bool))
        for i in range(c.n_layer):
            x = Block(c.n_head, c.layer_norm_epsilon, name=f"h_{i}")(x, mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_f")(x)
        return wte.attend(x)  # the head is tied to the token embedding


class GPT2LM(nn.Module):
    """`GPT2LMHeadModel` in Flax: `(batch, seq)` ids to `(batch, seq, vocab)`
    logits."""

    config: GPT2Config

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        return Transformer(self.config, name="transformer")(ids, attention_mask)


def template(config: GPT2Config):
    """The params' shapes, for `params_from_torch(..., like=...)`."""
    return jax.eval_shape(GPT2LM(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]


def make_apply(config: GPT2Config):
    """`apply_fn(params, ids, attention_mask=None) -> logits`."""
    model = GPT2LM(config)

    def apply_fn(params, ids, attention_mask=None):
        return model.apply({"params": params}, ids, attention_mask)

    return apply_fn


def torch_model(config: GPT2Config, seed: int = 0):
    """A `GPT2LMHeadModel` with random weights, in evaluation mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config.to_hf()).eval()


def num_params(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# The task: sequences of a random Markov chain.


def markov_sequences(num_sequences: int, seq_len: int, vocab_size: int,
                     successors: int = 3, seed: int = 0):
    """`(tokens, entropy_rate)`: `(num_sequences, seq_len)` int32 sequences
    of a Markov chain in which each token is followed by one of
    `successors` tokens (with random probabilities) nine times in ten, and by
    any token otherwise; and the chain's entropy rate in nats, the expected
    next-token loss of its own transition probabilities."""
    rng = np.random.default_rng(seed)
    probs = np.full((vocab_size, vocab_size), 0.1 / vocab_size)
    for a in range(vocab_size):
        nxt = rng.choice(vocab_size, successors, replace=False)
        probs[a, nxt] += 0.9 * rng.dirichlet(np.ones(successors))
    cumulative = np.cumsum(probs, axis=1)
    tokens = np.empty((num_sequences, seq_len), np.int64)
    tokens[:, 0] = rng.integers(0, vocab_size, num_sequences)
    for t in range(1, seq_len):
        u = rng.random(num_sequences)[:, None]
        tokens[:, t] = np.minimum(
            (u > cumulative[tokens[:, t - 1]]).sum(axis=1), vocab_size - 1)
    # The stationary distribution weighs each token's entropy.
    evals, evecs = np.linalg.eig(probs.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()
    entropy = float(-np.sum(pi[:, None] * probs * np.log(probs)))
    return tokens.astype(np.int32), entropy


# ---------------------------------------------------------------------------
# Training, with a checkpoint series.


def train(loss_fn, params, data, steps: int, save_at, batch_size: int = 16,
          learning_rate: float = 3e-3, seed: int = 0):
    """Adam on minibatches of `data`; returns `(losses, {step: params})`
    with the params after each step in `save_at` (0: before training)."""
    adam = optax.adam(learning_rate)
    n = data["input_ids"].shape[0]

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    opt_state = adam.init(params)
    saved = {0: params} if 0 in save_at else {}
    losses = []
    for t in range(1, steps + 1):
        rows = rng.choice(n, batch_size, replace=False)
        batch = {k: v[rows] for k, v in data.items()}
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        if t in save_at:
            saved[t] = params
    return np.asarray(losses), saved


def checkpoint_steps(train_steps: int, count: int) -> list:
    """`count` steps spread geometrically over training, the last one
    `train_steps`: the loss changes fastest early on."""
    if count == 1:
        return [train_steps]
    first = max(1, train_steps // 2 ** (count - 1))
    steps = np.geomspace(first, train_steps, count).round().astype(int)
    return sorted(set(steps.tolist()))


# ---------------------------------------------------------------------------
# The LLC's settings: SGLD with minibatches of 8 sequences of 64 tokens. The
# loss is a mean over tokens, and nbeta = 1000 puts the posterior's scale at
# that of about 1000 tokens' evidence. The localization is strong enough, and
# the step small enough, that the loss traces are flat and the result's
# checks (R-hat, ESS) pass at every checkpoint with 4 chains x 200 draws; a
# weaker localization (300) leaves the chains drifting for longer than that.
LLC = dict(nbeta=1000.0, learning_rate=1e-4, localization=1000.0,
           batch_size=8, num_burnin_steps=0)


def plot_series(path, train_losses, entropy, series, title):
    """The training loss with $L_n(w^*)$ at each checkpoint, and the LLC
    (mean and one std over chains; hollow where a check failed) against
    the training step: `series.plot()` with the training loss beside it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_loss, ax_llc = fig.subplots(1, 2)
    x = np.maximum(series.steps, 1)  # step 0 on a log axis
    ax_loss.plot(np.arange(1, len(train_losses) + 1), train_losses, lw=0.8,
                 color="0.3", label="training minibatch loss")
    ax_loss.axhline(entropy, ls="--", color="C2", lw=1,
                    label=f"entropy rate {entropy:.3f}")
    ax_loss.plot(x, series.init_loss, "o", color="C0", ms=4,
                 label="checkpoints, $L_n(w^*)$")
    ax_loss.set(xscale="log", xlabel="training step", ylabel="loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_llc.errorbar(x, series.llc_mean, yerr=series.llc_std, fmt="-",
                    capsize=3, color="C0")
    ok = series.trustworthy
    ax_llc.plot(x[ok], series.llc_mean[ok], "o", color="C0")
    ax_llc.plot(x[~ok], series.llc_mean[~ok], "o", mfc="none", color="C3",
                label="a check failed")
    ax_llc.set(xscale="log", xlabel="training step",
               ylabel=r"$\hat\lambda$ (mean $\pm$ std over chains)")
    if not ok.all():
        ax_llc.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def main(train_steps: int = 300, checkpoints: int = 4, num_chains: int = 4,
         num_draws: int = 200, num_sequences: int = 512, seq_len: int = 64,
         n_embd: int = 32, n_layer: int = 2, seed: int = 0,
         out_dir: str = "gpt2_llc_checkpoints",
         plot: Optional[str] = "gpt2_llc.png",
         group_size: Optional[int] = None) -> dict:
    """Runs the four steps above; returns what they found.

    `group_size` checkpoints are sampled together; by default
    `so.estimate_llc_series` chooses as many as its memory budget allows
    (all of them for models this small), and fewer bound the memory.

    Returns:
      A dict with `"logits_max_diff"` (torch against Flax, step 1),
      `"num_params"`, `"entropy"` (the task's entropy rate),
      `"train_losses"`, `"steps"` and `"paths"` of the checkpoints,
      `"series"`, the `LLCSeriesResult`, and `"results"`, its `LLCResult`
      per checkpoint.
    """
    import torch

    config = GPT2Config(n_positions=max(seq_len, 8), n_embd=n_embd,
                        n_layer=n_layer)
    rules = torch_interop.gpt2_rules()
    like = template(config)

    # 1. PyTorch -> Flax, with the same logits.
    hf = torch_model(config, seed)
    params = torch_interop.params_from_torch(hf, like=like, rules=rules)
    d = num_params(params)
    print(f"1. GPT2LMHeadModel({n_layer} layers, n_embd={n_embd}, "
          f"vocab={config.vocab_size}): {d} parameters, loaded into Flax")
    apply_fn = make_apply(config)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size,
                                               (4, seq_len))
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(apply_fn)(params, ids))
    logits_diff = float(np.max(np.abs(got - expected)))
    print(f"   the logits agree: max |flax - torch| = {logits_diff:.1e}")
    if not logits_diff < 1e-5:
        raise RuntimeError(f"the logits differ by {logits_diff:.2e}")

    # 2. Train on a Markov chain's sequences, saving a checkpoint series.
    tokens, entropy = markov_sequences(num_sequences, seq_len,
                                       config.vocab_size, seed=seed)
    data = so.token_data(tokens)
    loss_fn = so.causal_lm_loss(apply_fn)
    steps = checkpoint_steps(train_steps, checkpoints)
    start = time.perf_counter()
    train_losses, saved = train(loss_fn, params, data, train_steps,
                                set(steps), seed=seed)
    print(f"2. trained {train_steps} Adam steps in "
          f"{time.perf_counter() - start:.1f}s: minibatch loss "
          f"{train_losses[0]:.3f} -> {train_losses[-1]:.3f} nats/token "
          f"(the chain's entropy rate is {entropy:.3f})")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in steps:
        path = out / f"step_{s:06d}.safetensors"
        torch_interop.save_torch_checkpoint(saved[s], path, like=hf,
                                            rules=rules)
        paths.append(path)
    print(f"   saved {len(paths)} checkpoints (steps {steps}) in {out}/")

    # 3. The LLC at every checkpoint, read back from its file; the
    # checkpoints' chains run together, each checkpoint's as estimate_llc
    # would run them there with the same key.
    print(f"3. LLC: SGLD, {num_chains} chains x {num_draws} draws, batches of "
          f"{LLC['batch_size']} x {seq_len} tokens, nbeta={LLC['nbeta']:g}, "
          f"lr={LLC['learning_rate']:g}, localization={LLC['localization']:g}")
    start = time.perf_counter()
    series = so.estimate_llc_series(
        loss_fn, paths, data, steps=steps, like=like, rules=rules,
        group_size=group_size, key=seed, num_chains=num_chains,
        num_draws=num_draws, **LLC)
    elapsed = time.perf_counter() - start
    for s, result in zip(steps, series.results):
        failed = [c.name for c in result.checks if not c.passed]
        print(f"   step {s:5d}: L_n = {result.init_loss:.3f}, LLC = "
              f"{result.llc_mean:7.2f} +- {result.llc_std:5.2f} "
              f"(MCSE {result.mcse:.2f}), "
              + (f"checks failed: {', '.join(failed)}" if failed
                 else "all checks pass"))
    print(f"   {len(paths)} checkpoints in {elapsed:.1f}s, compilation "
          f"included; a regular model with {d} parameters would have LLC "
          f"{d / 2:g}")

    # 4. The plot.
    if plot:
        plot_series(plot, train_losses, entropy, series,
                    f"GPT-2, {d} parameters, on a Markov chain's sequences")
        print(f"4. wrote {plot}")
    return dict(logits_max_diff=logits_diff, num_params=d, entropy=entropy,
                train_losses=train_losses, steps=steps, paths=paths,
                series=series, results=series.results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-draws", type=int, default=200)
    parser.add_argument("--num-sequences", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="gpt2_llc_checkpoints")
    parser.add_argument("--plot", default="gpt2_llc.png")
    parser.add_argument("--group-size", type=int, default=None,
                        help="checkpoints sampled together (default: as "
                        "many as so.estimate_llc_series's memory budget "
                        "allows)")
    args = parser.parse_args()
    main(**{k.replace("-", "_"): v for k, v in vars(args).items()})
