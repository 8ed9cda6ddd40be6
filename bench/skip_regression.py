"""How well the linear map alone reconstructs each MLP: the ridge regression a skip transcoder starts from.

    python bench/skip_regression.py [--layers 0 2 9 11 15 20 28 29] [--tokens 24576]

Collects the circuits' training tokens (`tutorials.cache._circuit_store`: documentation plus one
third year sentences, bfloat16) for the chosen layers, fits `training.least_squares_skip` (scaled
MLP output on scaled MLP input, the units `Transcoder` uses) on samples of several sizes with
several ridge terms, and prints the FVU on that sample and on 1,024 held-out tokens of the default
corpus (8 contexts of 128, as `bench/circuit_scores.py`): which sample size makes the regression
well posed for d_in = 576, and which ridge term (`training.SKIP_RIDGE`) to use.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

import tcwidgets as tcw
from tcwidgets.splicing import splice
from tcwidgets.training import least_squares_skip
from tcwidgets.tutorials.cache import _circuit_store

SIZES = (1024, 2048, 4096, 8192, 16384, 24576)
RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def fvu(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(((target - prediction) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 2, 9, 11, 15, 20, 28, 29])
    parser.add_argument("--tokens", type=int, default=24_576, help="training tokens (the default setting's)")
    args = parser.parse_args()
    lm = tcw.load_model()
    test = tcw.load_corpus("python-docs", lm, context=128, n_tokens=128 * 8, split="test")
    with torch.no_grad():
        held_out = splice(lm, {}, test, save_mlp=args.layers, progress=False).mlp
    with tempfile.TemporaryDirectory() as folder:
        store = _circuit_store(lm, args.layers, args.tokens, Path(folder) / "store")
        for layer in args.layers:
            stats = store.stats(layer)
            input_scale, output_scale = math.sqrt(lm.d_model) / stats.in_norm, math.sqrt(lm.d_model) / stats.out_norm
            x_test, y_test = (t.reshape(-1, lm.d_model).double() * s
                              for t, s in zip(held_out[layer], (input_scale, output_scale)))
            for n in (size for size in SIZES if size <= store.n_tokens):
                x, y = store.sample(layer, n, seed=1)
                x, y = x.double() * input_scale, y.double() * output_scale
                cells = []
                for ridge in RIDGES:
                    W, b = least_squares_skip(x, y, ridge)
                    cells.append(f"ridge {ridge:g}: sample {fvu(x @ W.T + b, y):.3f}, "
                                 f"held-out {fvu(x_test @ W.T + b, y_test):.3f}")
                print(f"layer {layer}, {n} tokens: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
