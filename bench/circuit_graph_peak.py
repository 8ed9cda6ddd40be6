"""The full graph of notebook 07's prompt for one set of `bench/circuit_scores.py`: its node count,
and the peak memory without file-backed pages of a learner's steps (load the model and the set's
cached transcoders, `attribute(depth=0)`, `scores()`, `prune(0.6, 0.9)`), the measure notebook 07's
2 GB limit is about.

    TCWIDGETS_TUTORIAL_FAST=1 OMP_NUM_THREADS=1 python bench/circuit_graph_peak.py [--set every-layer-skip]

``RssAnon`` is sampled every 20 ms by a thread (the kernel keeps no high-water mark of it). Linux only.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

import torch

import tcwidgets as tcw
from circuit_memory import _status
from circuit_scores import SETS
from tcwidgets.tutorials import circuit_transcoders
from tcwidgets.tutorials.greater_than import TEMPLATE, greater_target


class PeakAnonymous:
    """The largest ``RssAnon`` (GB) seen since it started, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="every-layer-skip",
                        choices=[name for name, s in SETS.items() if not s.get("clt")])
    chosen = SETS[parser.parse_args().set]
    peak = PeakAnonymous()
    lm = tcw.load_model()
    options = {"kind": chosen["kind"]} if "kind" in chosen else {}
    transcoders = circuit_transcoders(lm, chosen["layers"], k=chosen["k"],
                                      n_latents=chosen.get("width", 2) * lm.d_model, **options)
    print(f"torch threads {torch.get_num_threads()}; model and transcoders loaded: peak {peak.peak:.2f} GB", flush=True)
    start = time.perf_counter()
    graph = tcw.attribute(lm, transcoders, TEMPLATE.format(32), greater_target(3), depth=0)
    scores = graph.scores()
    adjacency = graph.adjacency()
    print(f"full graph: {len(adjacency.matrix)} nodes ({adjacency.n_latents} latents), replacement "
          f"{scores.replacement:.3f}, completeness {scores.completeness:.3f}, {time.perf_counter() - start:.0f} s; "
          f"peak {peak.peak:.2f} GB", flush=True)
    pruned = graph.prune(0.6, 0.9)
    kinds = Counter(node.kind for node in pruned.nodes.values())
    time.sleep(0.05)
    print(f"prune(0.6, 0.9): {len(pruned.nodes)} nodes {dict(kinds)}; peak {peak.peak:.2f} GB without file-backed pages")


if __name__ == "__main__":
    main()
