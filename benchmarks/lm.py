"""The LLC of a small GPT-2: `so.estimate_llc` against devinterp 2.0.1's `llc()`.

The model is the GPT-2 of `examples/gpt2_llc.py` (2 layers, width 32, a
vocabulary of 32, 28,544 parameters), trained briefly on sequences of a
random Markov chain and saved as a `.safetensors` checkpoint. Both libraries
then estimate its LLC from that file with the same hyperparameters: SGLD, 4
chains x 200 draws, batches of 8 sequences of 64 tokens, no burn-in.

- sgld_optax: `so.estimate_llc(so.causal_lm_loss(apply_fn), params, data)`
  on the Flax model read with `torch_interop.params_from_torch(path,
  rules=gpt2_rules())`, the data from `so.token_data`.
- devinterp: `devinterp.slt.llc.llc(model, dataset, {}, ...)` on the
  `GPT2LMHeadModel` loaded from the file, the data a Hugging Face `Dataset`
  of `input_ids`, its results written to a zarr store in a temporary
  directory (as `llc()` does).

The data are 256 sequences, 32 batches: L_n(w*) is the loss over the same 32
batches on both sides (devinterp evaluates them once per chain). Cold is the
first call in the process (our compilation included); warm is the median of
`--repeats` later calls, the two libraries called in turns so that a change
in the machine's load hits both. The table gives the CPU model and the load
average before and after; other processes on the machine slow both.

    python benchmarks/lm.py
    python benchmarks/lm.py --repeats 5 --json lm.json
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")   # devinterp's progress bars

import jax  # noqa: E402
import numpy as np  # noqa: E402

import sgld_optax as so  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import cpu_model  # noqa: E402
from sgld_optax import torch_interop  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location(
        "gpt2_llc", ROOT / "examples" / "gpt2_llc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(num_chains=4, num_draws=200, batch_size=8, seq_len=64,
         num_sequences=256, train_steps=150, repeats=3, seed=0, json_path=None):
    import datasets
    import torch
    from devinterp.slt.llc import llc
    from safetensors.torch import load_file

    gpt2 = _example()
    config = gpt2.GPT2Config(n_positions=seq_len)
    rules = torch_interop.gpt2_rules()
    like = gpt2.template(config)
    apply_fn = gpt2.make_apply(config)
    loss_fn = so.causal_lm_loss(apply_fn)

    # The checkpoint: the example's model, trained briefly.
    tokens, _ = gpt2.markov_sequences(num_sequences, seq_len,
                                      config.vocab_size, seed=seed)
    data = so.token_data(tokens)
    model = gpt2.torch_model(config, seed)
    params = torch_interop.params_from_torch(model, like=like, rules=rules)
    _, saved = gpt2.train(loss_fn, params, data, train_steps, {train_steps},
                          seed=seed)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="lm_bench_"))
    path = torch_interop.save_torch_checkpoint(
        saved[train_steps], workdir / "gpt2.safetensors", like=model,
        rules=rules)
    params = torch_interop.params_from_torch(path, like=like, rules=rules)
    model.load_state_dict(load_file(path), strict=True)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": tokens.astype(np.int64)}).with_format("torch")
    d = gpt2.num_params(params)
    hp = dict(gpt2.LLC, batch_size=batch_size, num_burnin_steps=0)

    def ours(key):
        result = so.estimate_llc(loss_fn, params, data, key=key,
                                 num_chains=num_chains, num_draws=num_draws,
                                 progress=False, **hp)
        return result.llc_mean

    calls = iter(range(10 ** 6))

    def theirs(key):
        out = llc(model, dataset, {}, lr=hp["learning_rate"],
                  n_beta=hp["nbeta"], localization=hp["localization"],
                  num_chains=num_chains, num_draws=num_draws,
                  batch_size=batch_size, num_burnin_steps=0,
                  num_init_loss_batches=num_sequences // batch_size,
                  init_seed=100 + key,
                  output_path=str(workdir / f"devinterp_{next(calls)}.zarr"))
        return float(out.llc_mean)

    def timed(fn, key):
        start = time.perf_counter()
        value = fn(key)
        return time.perf_counter() - start, value

    load_before = load_average()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average "
          f"{load_before}")
    print(f"GPT-2 of examples/gpt2_llc.py: {d} parameters; {num_chains} chains"
          f" x {num_draws} draws, batches of {batch_size} x {seq_len} tokens, "
          f"{num_sequences} sequences")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = {"sgld_optax": timed(ours, 0), "devinterp": timed(theirs, 0)}
        warm = {"sgld_optax": [], "devinterp": []}
        estimates = {"sgld_optax": [cold["sgld_optax"][1]],
                     "devinterp": [cold["devinterp"][1]]}
        for r in range(1, repeats + 1):
            for name, fn in (("sgld_optax", ours), ("devinterp", theirs)):
                seconds, value = timed(fn, r)
                warm[name].append(seconds)
                estimates[name].append(value)
    load_after = load_average()

    med = {k: statistics.median(v) for k, v in warm.items()}
    ratio = med["devinterp"] / med["sgld_optax"]
    rows = [
        ("sgld_optax `estimate_llc`", cold["sgld_optax"][0], med["sgld_optax"],
         estimates["sgld_optax"]),
        ("devinterp 2.0.1 `llc()`", cold["devinterp"][0], med["devinterp"],
         estimates["devinterp"]),
    ]
    print()
    print(f"| | cold (s) | warm (s, median of {repeats}) | LLC (mean over calls) |")
    print("|---|---|---|---|")
    for name, c, w, values in rows:
        print(f"| {name} | {c:.2f} | {w:.2f} | {np.mean(values):.1f} "
              f"+- {np.std(values):.1f} |")
    print()
    print(f"warm speed-up: {ratio:.1f}x (devinterp's time over ours)")
    print(f"load average before {load_before}, after {load_after}; "
          f"jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(cpu=cpu_model(), cores=os.cpu_count(),
                           load_before=load_before, load_after=load_after,
                           num_params=d, cold={k: v[0] for k, v in cold.items()},
                           warm=warm, ratio=ratio, estimates=estimates), f,
                      indent=1)
    return dict(cold=cold, warm=warm, ratio=ratio, estimates=estimates)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-draws", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results")
    args = parser.parse_args()
    main(num_chains=args.num_chains, num_draws=args.num_draws,
         repeats=args.repeats, json_path=args.json)
