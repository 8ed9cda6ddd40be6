"""The memory `CircuitGraph.scores` and `CircuitGraph.prune` take on notebook 07's full graph, against
circuit-tracer's dense way of computing the same (a normalised copy of the whole [nodes, nodes]
matrix for the influence, a zeroed clone of it for the edges, and a sort of all nodes² edge scores).

    python bench/circuit_memory.py

Builds notebook 07's graph (every-layer transcoders of `tutorials.circuit_transcoders`, trained once
and cached; the greater-than prompt), then, each in a fresh child process so that neither sees the
other's freed memory, measures the peak resident memory added by scores and prune (the kernel's
high-water mark, reset just before: ``/proc/self/clear_refs``), and checks that both ways give the
same scores and the same pruned graph. Linux only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

FULL_MATRICES = ("dense", "package")


def _status(field: str) -> float:
    """A ``/proc/self/status`` field in GB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise KeyError(field)


def dense_influence(normalized: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """circuit-tracer 0.5.0's ``compute_influence`` on a normalised matrix."""
    current = weights @ normalized
    total = current.clone()
    while current.any():
        current = current @ normalized
        total += current
    return total


def dense(adjacency) -> tuple[tuple[float, float], torch.Tensor, torch.Tensor]:
    """circuit-tracer 0.5.0's ``compute_graph_scores`` and ``prune_graph``, dense, as tcwidgets did before."""
    from tcwidgets.circuits.adjacency import drop_dead_ends, normalize

    def threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
        ordered = torch.sort(scores, descending=True).values
        cumulative = torch.cumsum(ordered, 0) / ordered.sum()
        return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))),
                           len(ordered) - 1)]

    weights, matrix = adjacency.output_weights, adjacency.matrix
    normalized = normalize(matrix)
    total = dense_influence(normalized, weights)
    tokens, errors = total[adjacency.token_slice].sum(), total[adjacency.error_slice].sum()
    explained = 1 - normalized[:, adjacency.error_slice].sum(-1)
    scores = (float(tokens / (tokens + errors)), float((explained * (total + weights)).sum() / (total + weights).sum()))
    del normalized
    node_mask = total >= threshold(total, 0.6)
    inner = adjacency.token_slice.start
    node_mask[inner:] = True
    pruned = matrix.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize(pruned)
    del pruned
    edge_scores = normalized.mul_((dense_influence(normalized, weights) + weights)[:, None])
    edge_mask = edge_scores >= threshold(edge_scores.flatten(), 0.9)
    drop_dead_ends(node_mask, edge_mask, adjacency)
    return scores, node_mask, edge_mask


def package(adjacency) -> tuple[tuple[float, float], torch.Tensor, torch.Tensor]:
    from tcwidgets.circuits.adjacency import prune, scores

    node_mask, edge_mask, _ = prune(adjacency, 0.6, 0.9)
    return scores(adjacency), node_mask, edge_mask


def child(way: str) -> None:
    """Build notebook 07's full graph, then measure ``way``'s scores and prune; print JSON."""
    import tcwidgets as tcw
    from tcwidgets import tutorials as tut
    from tcwidgets.tutorials.greater_than import TEMPLATE, greater_target

    lm = tcw.load_model()
    transcoders = tut.circuit_transcoders(lm)
    graph = tcw.attribute(lm, transcoders, TEMPLATE.format(32), greater_target(3), depth=0)
    adjacency = graph.adjacency()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the high-water mark starts again from here
    start = time.perf_counter()
    scores, node_mask, edge_mask = {"dense": dense, "package": package}[way](adjacency)
    seconds = time.perf_counter() - start
    print(json.dumps({"way": way, "nodes": len(adjacency.matrix), "added_gb": _status("VmHWM") - before,
                      "seconds": seconds, "scores": scores, "node_mask": node_mask.nonzero().flatten().tolist(),
                      "edges": int(edge_mask.sum()), "edge_hash": int((edge_mask.nonzero() * torch.tensor([7, 1])).sum())}))


def main() -> None:
    runs = {}
    for way in FULL_MATRICES:
        out = subprocess.run([sys.executable, __file__, "--child", way], capture_output=True, text=True, check=True)
        runs[way] = json.loads(out.stdout.strip().splitlines()[-1])
    d, p = runs["dense"], runs["package"]
    assert d["node_mask"] == p["node_mask"] and d["edges"] == p["edges"] and d["edge_hash"] == p["edge_hash"], \
        "the pruned graphs differ"
    assert all(abs(a - b) < 1e-12 for a, b in zip(d["scores"], p["scores"])), (d["scores"], p["scores"])
    print(f"full graph of notebook 07: {d['nodes']} nodes ({d['nodes'] ** 2 * 8 / 2**30:.2f} GB per float64 "
          f"[nodes, nodes] matrix), torch threads {torch.get_num_threads()}")
    for way in FULL_MATRICES:
        r = runs[way]
        print(f"  {way:8s}: scores + prune(0.6, 0.9) add {r['added_gb']:.3f} GB at peak, {r['seconds']:.1f} s; "
              f"replacement {r['scores'][0]:.4f}, completeness {r['scores'][1]:.4f}, "
              f"{len(r['node_mask'])} nodes and {r['edges']} edges kept")
    print(f"  peak memory added: package / dense = {p['added_gb'] / d['added_gb']:.2f}; "
          f"time: package / dense = {p['seconds'] / d['seconds']:.2f}; same scores and pruned graph")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
