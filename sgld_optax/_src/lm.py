r"""Language models: the next-token loss over token sequences, and token data.

`causal_lm_loss` turns a model's `apply_fn(params, input_ids) -> logits` into
the `loss_fn(params, batch)` that `estimate_llc` takes, for batches of token
sequences shaped `(batch, seq)`. `token_data` reads the token sequences of a
NumPy, JAX or torch array, a Hugging Face `datasets.Dataset`, or any iterable
of batches (a torch `DataLoader`) into NumPy arrays with a leading example
axis, the in-memory data `estimate_llc` samples minibatches from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"


def _split_batch(batch):
    """`(input_ids, attention_mask or None)` of a batch."""
    if isinstance(batch, Mapping):
        if INPUT_IDS not in batch:
            raise ValueError(
                "a batch given as a dict must have an 'input_ids' entry; got "
                f"the keys {sorted(map(str, batch))}.")
        return batch[INPUT_IDS], batch.get(ATTENTION_MASK)
    return batch, None


def _check_tokens(input_ids, attention_mask):
    """`input_ids` and `attention_mask` as arrays, or a clear error."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            "input_ids must be integer token ids shaped (batch, seq); got "
            f"shape {input_ids.shape} and dtype {input_ids.dtype}.")
    if input_ids.shape[1] < 2:
        raise ValueError(
            "sequences must have at least 2 tokens for a next-token loss; got "
            f"input_ids of shape {input_ids.shape}.")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids, "
                f"{input_ids.shape}; got {attention_mask.shape}.")
    return input_ids, attention_mask


def _next_token_nll(logits, input_ids, attention_mask=None):
    r"""The mean next-token negative log-likelihood, and how many tokens count.

    Args:
      logits: `(batch, seq, vocab)` logits; position $t$ predicts token
        $t + 1$.
      input_ids: `(batch, seq)` integer token ids.
      attention_mask: optional `(batch, seq)` mask, nonzero at real tokens.

    Returns:
      `(mean, count)`: the float32 mean of $-\log p(x_{t+1} \mid x_{\le t})$
      over the counted predictions, and their number.
    """
    logits = jnp.asarray(logits)
    input_ids, attention_mask = _check_tokens(input_ids, attention_mask)
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            "apply_fn must return logits shaped (batch, seq, vocab) = "
            f"{input_ids.shape + ('vocab',)}; got {logits.shape}.")
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    if attention_mask is None:
        return jnp.mean(nll), jnp.asarray(nll.size, jnp.float32)
    weight = (attention_mask[:, 1:] != 0).astype(jnp.float32)
    count = jnp.sum(weight)
    return jnp.sum(nll * weight) / jnp.maximum(count, 1.0), count


class _CausalLMLoss:
    """The loss of `causal_lm_loss`: equal for equal arguments, so that
    `estimate_llc`'s compiled program is reused across calls."""

    def __init__(self, apply_fn, pass_attention_mask):
        self.apply_fn = apply_fn
        self.pass_attention_mask = pass_attention_mask
        self.__doc__ = (f"Next-token cross-entropy of {apply_fn!r}: "
                        "loss_fn(params, batch) -> scalar.")

    def __call__(self, params, batch):
        input_ids, attention_mask = _check_tokens(*_split_batch(batch))
        if self.pass_attention_mask:
            logits = self.apply_fn(params, input_ids, attention_mask)
        else:
            logits = self.apply_fn(params, input_ids)
        return _next_token_nll(logits, input_ids, attention_mask)[0]

    def _key(self):
        return (self.apply_fn, self.pass_attention_mask)

    def __eq__(self, other):
        return isinstance(other, _CausalLMLoss) and self._key() == other._key()

    def __hash__(self):
        return hash((_CausalLMLoss, self._key()))

    def __repr__(self):
        return (f"causal_lm_loss({self.apply_fn!r}, pass_attention_mask="
                f"{self.pass_attention_mask})")


def causal_lm_loss(apply_fn: Callable[..., jax.Array], *,
                   pass_attention_mask: bool = False
                   ) -> Callable[[Any, Any], jax.Array]:
    r"""The per-token cross-entropy of a causal language model, as a `loss_fn`.

    Returns `loss_fn(params, batch)` for `estimate_llc` (or training), where
    `batch` is either an integer array `input_ids` shaped `(batch, seq)`, or
    a dict with `"input_ids"` and, optionally, `"attention_mask"` (the same
    shape, nonzero at real tokens, 0 at padding); other entries are ignored.
    `apply_fn(params, input_ids)` returns the logits, `(batch, seq, vocab)`,
    position $t$ predicting token $t + 1$.

    The loss is the mean negative log-likelihood of the next token,

    $$
    L_B(w) = \frac{1}{\sum_{b,t} m_{b,t+1}} \sum_{b=1}^{B} \sum_{t=0}^{T-2}
    m_{b,t+1} \left(-\log \operatorname{softmax}\big(f_w(x_b)_t\big)_{x_{b,t+1}}\right),
    $$

    positions counted from 0, as in the arrays, and the logits $f_w(x_b)_t$
    taken in float32. A prediction counts when the
    token it predicts is real: $m_{b,t+1} = 1$ where
    `attention_mask[b, t + 1]` is nonzero, and every one of the $B(T-1)$
    predictions counts without a mask. The first token of each sequence is
    never predicted, and the last position's logits are not used. This is
    the loss of Hugging Face's `GPT2LMHeadModel(input_ids,
    labels=input_ids)` (its `labels` set to -100 where `attention_mask` is
    0, when there is a mask), and, without a mask, the mean of devinterp's
    per-token loss, which is what its `llc()` averages. A batch in which no
    prediction counts has loss 0.

    With `pass_attention_mask=True`, the model is called as
    `apply_fn(params, input_ids, attention_mask)` (the mask `None` when the
    batch has none), for models that mask padded keys in attention. A model
    that is only causally masked computes the same logits at the real tokens
    of right-padded sequences either way.

    The minibatch loss is a mean over the batch's counted tokens, so
    `estimate_llc`'s $L_n(w^*)$ is the mean, over batches of `batch_size`
    sequences, of their per-token means: the per-token mean over the whole
    data when every sequence has the same number of real tokens.

    Loss functions from equal arguments compare equal, so `estimate_llc`
    reuses its compiled program for `causal_lm_loss(apply_fn)` called again
    with the same `apply_fn` object.

    Args:
      apply_fn: `apply_fn(params, input_ids) -> logits` (or
        `apply_fn(params, input_ids, attention_mask)`), such as
        `lambda p, ids: model.apply({"params": p}, ids)` for a Flax linen
        model.
      pass_attention_mask: give the batch's attention mask to `apply_fn`.

    Returns:
      `loss_fn(params, batch) -> scalar`, the float32 mean next-token loss.

    Raises:
      ValueError: when `loss_fn` is called (or traced) on `input_ids` that
        are not integers shaped `(batch, seq)` with `seq >= 2`, on logits
        not shaped `(batch, seq, vocab)`, or on an attention mask of
        another shape.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import sgld_optax as so
      >>> table = jax.random.normal(jax.random.key(0), (16, 16))
      >>> bigram = lambda w, ids: w[ids]     # logits from the current token
      >>> loss_fn = so.causal_lm_loss(bigram)
      >>> ids = jnp.array([[1, 2, 3, 0], [4, 5, 0, 0]])
      >>> mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
      >>> loss = loss_fn(table, {"input_ids": ids, "attention_mask": mask})
      >>> # Four predictions count: 1->2, 2->3, 3->0 and 4->5.
      >>> nll = lambda a, b: jax.nn.logsumexp(table[a]) - table[a, b]
      >>> bool(jnp.isclose(loss, (nll(1, 2) + nll(2, 3) + nll(3, 0)
      ...                         + nll(4, 5)) / 4))
      True
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {apply_fn!r}.")
    if not isinstance(pass_attention_mask, (bool, np.bool_)):
        raise TypeError(
            f"pass_attention_mask must be a bool, got {pass_attention_mask!r}.")
    return _CausalLMLoss(apply_fn, bool(pass_attention_mask))


# ---------------------------------------------------------------------------
# Token data.


def _host(x) -> np.ndarray:
    """A NumPy array from a NumPy/JAX/torch array or a nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu()
    return np.asarray(x)


def _is_hf_dataset(source) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "with_format")


def _stack_rows(rows, name: str, pad_value: Optional[int]):
    """`(array, lengths or None)`: rows stacked, right-padded if ragged."""
    try:
        arr = _host(rows)
        if arr.dtype != object and arr.ndim >= 1:
            return arr, None
    except ValueError:  # a ragged nested list
        pass
    rows = [_host(r) for r in rows]
    lengths = np.array([r.shape[0] if r.ndim else 0 for r in rows])
    if len(set(lengths.tolist())) <= 1:
        return np.stack(rows), None
    if pad_value is None:
        raise ValueError(
            f"the sequences of {name} have different lengths (from "
            f"{lengths.min()} to {lengths.max()} tokens); pad them to one "
            "length (a tokenizer's padding, or grouping the text into blocks), "
            "or pass pad_id= to right-pad them here with an attention mask.")
    out = np.full((len(rows), int(lengths.max())), pad_value,
                  dtype=np.result_type(*[r.dtype for r in rows]))
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out, lengths


def _columns_of_hf(dataset):
    names = dataset.column_names
    if INPUT_IDS not in names:
        raise ValueError(
            "the dataset has no 'input_ids' column (its columns are "
            f"{names}); tokenize it first.")
    wanted = [c for c in (INPUT_IDS, ATTENTION_MASK) if c in names]
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows.")
    # One read of the whole table: the columns come back as arrays (object
    # arrays of rows when the sequences differ in length).
    return dict(dataset.with_format("numpy", columns=wanted)[:])


def _columns_of_batch(batch, where: str) -> dict:
    if isinstance(batch, Mapping):
        if INPUT_IDS not in batch:
            raise ValueError(
                f"{where} has no 'input_ids' entry (its keys are "
                f"{sorted(map(str, batch))}).")
        return {c: batch[c] for c in (INPUT_IDS, ATTENTION_MASK) if c in batch}
    if isinstance(batch, (tuple, list)) and not _is_array(batch):
        if len(batch) == 1:
            return {INPUT_IDS: batch[0]}
        if len(batch) == 2:
            return {INPUT_IDS: batch[0], ATTENTION_MASK: batch[1]}
        raise ValueError(
            f"{where} is a sequence of {len(batch)} items; a batch must be "
            "input_ids, (input_ids,), (input_ids, attention_mask) or a dict "
            "with 'input_ids'.")
    return {INPUT_IDS: batch}


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _columns_of_batches(source) -> dict:
    parts: dict = {}
    keys = None
    for i, batch in enumerate(source):
        cols = _columns_of_batch(batch, f"batch {i} of data")
        if keys is None:
            keys = sorted(cols)
        elif sorted(cols) != keys:
            raise ValueError(
                f"batch {i} of data has the entries {sorted(cols)}, the first "
                f"batch {keys}.")
        for c, v in cols.items():
            v = _host(v)
            if v.ndim != 2:
                raise ValueError(
                    f"{c} of batch {i} of data must be shaped (batch, seq); "
                    f"got {v.shape}.")
            parts.setdefault(c, []).append(v)
    if keys is None:
        raise ValueError("data yielded no batches.")
    lengths = {c: {p.shape[1] for p in v} for c, v in parts.items()}
    if len(lengths[INPUT_IDS]) > 1:
        # Ragged across batches: handled row by row, as a list of sequences.
        return {c: [row for p in v for row in p] for c, v in parts.items()}
    return {c: np.concatenate(v) for c, v in parts.items()}


def token_data(source: Any, *, pad_id: Optional[int] = None,
               dtype: Any = np.int32) -> dict:
    r"""Token sequences as in-memory data for `estimate_llc`.

    Reads `source` into a dict of NumPy arrays with a leading example axis:
    `"input_ids"`, `(n, seq)`, and `"attention_mask"`, `(n, seq)`, when the
    source has one (or when ragged sequences are padded here). Given to
    `estimate_llc` with a loss from `causal_lm_loss`, every step draws a
    minibatch of `batch_size` sequences, each chain in its own order, inside
    one compiled program; the same tokens in the same order give the same
    estimate with the same `key`, whatever they were read from.

    `source` may be:

    - an array of token ids shaped `(n, seq)`: NumPy, JAX or torch;
    - a dict with `"input_ids"` (and optionally `"attention_mask"`) arrays
      or lists of sequences;
    - a Hugging Face `datasets.Dataset` with an `input_ids` column (and
      optionally `attention_mask`; other columns, such as the text, are
      left out), read whole with `dataset.with_format("numpy")[:]`;
    - an iterable of batches, such as a torch `DataLoader`, read once,
      batch after batch, in the order it yields them: each batch an array
      `(batch, seq)`, a tuple `(input_ids,)` or `(input_ids,
      attention_mask)` (as from a `TensorDataset`), or a dict with
      `"input_ids"` (as from a `DataLoader` over a tokenized dataset).

    Token datasets for the LLC are usually small enough to hold in memory
    (10,000 sequences of 1,024 tokens take 40 MB as int32). A loader too
    big for that can be given to `estimate_llc` itself, which then takes
    one batch from it per chain and step.

    Args:
      source: the token sequences, as above.
      pad_id: token id to right-pad sequences of different lengths with;
        an attention mask then marks the real tokens (1) and the padding
        (0), combined with the source's own mask if it has one. Without
        it, sequences of different lengths are an error.
      dtype: integer dtype of `input_ids` (int32 by default, JAX's integer
        type unless 64-bit mode is on); `attention_mask` is kept as int32.

    Returns:
      A dict `{"input_ids": ..., "attention_mask": ...}` of NumPy arrays
      (the mask only when there is one), to pass as `data` to
      `estimate_llc`.

    Raises:
      ValueError: when there is no `input_ids` (column, key or batch
        entry), when the source holds no sequences, when `input_ids` is not
        shaped `(n, seq)` or holds values that `dtype` cannot represent,
        when the mask's shape differs from that of `input_ids`, and for
        sequences of different lengths without `pad_id`.
      TypeError: when `source` is none of the above.

    Examples:
      >>> import numpy as np
      >>> import sgld_optax as so
      >>> ids = np.random.default_rng(0).integers(0, 50, (64, 16))
      >>> data = so.token_data(ids)
      >>> data["input_ids"].shape, data["input_ids"].dtype
      ((64, 16), dtype('int32'))
      >>> ragged = {"input_ids": [[5, 6, 7], [8, 9]]}
      >>> so.token_data(ragged, pad_id=0)["attention_mask"].tolist()
      [[1, 1, 1], [1, 1, 0]]
    """
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"dtype must be an integer dtype, got {dtype}.")
    if _is_hf_dataset(source):
        cols = _columns_of_hf(source)
        name = "the dataset"
    elif isinstance(source, Mapping):
        cols = _columns_of_batch(source, "source")
        name = "source['input_ids']"
    elif _is_array(source):
        cols = {INPUT_IDS: source}
        name = "source"
    elif isinstance(source, (str, bytes)):
        raise TypeError("source must hold token ids, not text: tokenize it first.")
    elif isinstance(source, Iterable):
        cols = _columns_of_batches(source)
        name = "the batches"
    else:
        raise TypeError(
            "source must be an array of token ids, a dict with 'input_ids', "
            "a datasets.Dataset or an iterable of batches; got "
            f"{type(source).__name__}.")

    ids, lengths = _stack_rows(cols[INPUT_IDS], name, pad_id)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(
            f"input_ids must be shaped (n, seq) with n >= 1; got {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        if ids.size and np.issubdtype(ids.dtype, np.floating) and np.all(
                ids == np.round(ids)):
            ids = ids.astype(np.int64)
        else:
            raise ValueError(
                f"input_ids must be integer token ids; got dtype {ids.dtype}.")
    info = np.iinfo(dtype)
    if ids.size and (ids.min() < info.min or ids.max() > info.max):
        raise ValueError(
            f"input_ids has values from {ids.min()} to {ids.max()}, outside "
            f"the range of {dtype}.")
    out = {INPUT_IDS: ids.astype(dtype)}
    mask = None
    if ATTENTION_MASK in cols:
        mask, _ = _stack_rows(cols[ATTENTION_MASK], "the attention masks",
                              0 if lengths is not None else None)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids, "
                f"{ids.shape}; got {mask.shape}.")
        mask = (mask != 0).astype(np.int32)
    if lengths is not None:
        padded = (np.arange(ids.shape[1])[None, :]
                  < lengths[:, None]).astype(np.int32)
        mask = padded if mask is None else mask * padded
    if mask is not None:
        out[ATTENTION_MASK] = mask
    return out
