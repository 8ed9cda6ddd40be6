"""The adjacency matrix of a frozen run over every node, and circuit-tracer's influence, pruning and scores.

Nodes, in circuit-tracer's order: every active transcoder latent (at every position, layer by layer),
one error node per (layer, position) (the transcoder's error term, or the whole MLP output of a
layer without a transcoder), one token node per position (the first block's input: the token
embedding, plus the position embedding for GPT-2), and the target (a logit, a logit difference or
a latent's pre-activation) last. ``matrix[t, s]`` is the direct effect of source ``s`` on target
``t``: its activation times the derivative of ``t``'s value through frozen attention patterns, norm
scales and skip paths only (every other MLP output held fixed), exactly the contributions that
`FrozenRun.decompose` lists once attention heads and skip paths are folded in. Biases are not
nodes; each row's constant part is in ``bias``, so ``matrix.sum(1) + bias`` is every row's value.
At a folded position (`FrozenRun.folded`: BOS) no latent is active and the error nodes send
nothing: what the MLPs write there is part of ``bias``.

The matrix is built by one backward pass through the frozen linear system, batched over all rows,
from the top layer down. Influence, pruning and the two scores follow circuit-tracer 0.5.0
(``circuit_tracer/graph.py``: ``compute_node_influence``, ``compute_edge_influence``,
``prune_graph``, ``compute_graph_scores``) with one output row, the target, of weight 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import heap
from ..progress import delayed_bar
from .replay import CircuitError, FrozenRun, _float64, _Reader, skip_map

MAX_NODES = 30_000  # a dense float64 matrix of this many nodes takes 7.2 GB
CHUNK = 256  # rows per backward pass: bounds the memory (rows × positions × d_model float64 tensors)
BLOCK = 512  # rows of |matrix| formed at a time by `influence` and `scores` (the matrix itself is the one [nodes, nodes])


@dataclass
class Adjacency:
    """Direct effects between all nodes of a frozen run toward one target (float64).

    Rows and columns: ``latents`` (``[n, 3]``: layer, position, latent), ``errors`` (``[n, 2]``:
    layer, position), ``n_tokens`` token nodes, then the target.
    """

    matrix: Tensor  # [nodes, nodes]: matrix[target, source]
    bias: Tensor  # [nodes]: each row's constant part (biases); zero for rows without inputs
    values: Tensor  # [nodes]: latents' pre-activations and the target's value (else NaN)
    latents: Tensor  # [n_latents, 3] long
    activations: Tensor  # [n_latents]
    errors: Tensor  # [n_errors, 2] long
    n_tokens: int
    cached_influence: Tensor | None = field(default=None, repr=False)  # `node_influence`, once computed

    @property
    def n_latents(self) -> int:
        return len(self.latents)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_latents, self.n_latents + len(self.errors))

    @property
    def token_slice(self) -> slice:
        start = self.n_latents + len(self.errors)
        return slice(start, start + self.n_tokens)

    @property
    def output_weights(self) -> Tensor:
        """circuit-tracer's ``logit_weights``: 1 on the target, 0 elsewhere."""
        weights = torch.zeros(len(self.matrix), dtype=self.matrix.dtype)
        weights[-1] = 1.0
        return weights


def build_adjacency(run: FrozenRun, target: tuple[_Reader, float], target_value: float, n_writers: int) -> Adjacency:
    """The adjacency of ``run`` toward ``target`` (its reader and constant), over the writers of
    layers ``0 .. n_writers - 1`` (every layer for a logit; those below a latent target's layer)."""
    latent_rows, latent_constants, latents, activations, pre = [], [], [], [], []
    for layer in range(n_writers):
        frozen = run.layers[layer]
        if frozen.tc is None:
            continue
        positions, indices = torch.nonzero(frozen.latents, as_tuple=True)
        tc = frozen.tc
        w_enc = _float64(tc.W_enc[indices]) * tc.config.input_scale  # [active, d_model]
        latent_rows.append((frozen.mlp_norm.pullback(w_enc) / frozen.mlp_norm.scale[positions, None],
                            positions, frozen.mlp_stage))
        latent_constants.append(_float64(tc.b_enc[indices]) + w_enc @ frozen.mlp_norm.bias)
        latents.append(torch.stack([torch.full_like(positions, layer), positions, indices], 1))
        activations.append(frozen.latents[positions, indices])
        pre.append(frozen.pre[positions, indices])
    n = len(run.tokens)
    n_latents = sum(len(rows[1]) for rows in latent_rows)
    n_nodes = n_latents + n_writers * n + n + 1
    if n_nodes > MAX_NODES:
        raise CircuitError(f"The full graph has {n_nodes} nodes ({n_latents} active latents), more than {MAX_NODES} "
                           "a dense matrix here allows: use a shorter prompt or transcoders on fewer layers.")
    reader, constant = target
    # rows: latents (in node order), then the target; each starts as a vector at (stage, position)
    starts = [rows for rows, _, _ in latent_rows] + [reader.sigma * reader.w[None]]
    positions = torch.cat([p for _, p, _ in latent_rows] + [torch.tensor([reader.position])])
    stages = torch.cat([torch.full((len(p),), s) for _, p, s in latent_rows] + [torch.tensor([reader.stage])])
    vectors = torch.cat(starts) if starts else torch.zeros(0, run.token_embedding.shape[1], dtype=torch.float64)
    rows = torch.cat([torch.arange(n_latents), torch.tensor([n_nodes - 1])])
    matrix = torch.zeros(n_nodes, n_nodes, dtype=torch.float64)
    bias = torch.zeros(n_nodes, dtype=torch.float64)
    bias[rows] = torch.cat(latent_constants + [torch.tensor([constant], dtype=torch.float64)])
    columns, offset = {}, 0  # each layer's latent columns, in node order
    for layer, (_, latent_positions, _) in zip([l for l in range(n_writers) if run.layers[l].tc is not None],
                                                latent_rows):
        columns[layer] = torch.arange(offset, offset + len(latent_positions))
        offset += len(latent_positions)
    # chunks of rows by position, so that each pass covers only the positions its rows can see
    order = torch.argsort(positions, stable=True)
    chunks = order.split(CHUNK)
    # a pass over a chunk takes seconds per layer on a CPU: the bar moves by layer, not only by chunk
    bar = tqdm(total=len(chunks) * (max(n_writers, len(run.layers) - 1) + 1), desc="full graph", unit="layer",
               leave=False, disable=len(order) <= CHUNK)
    for chunk in chunks:
        _Backward(run, matrix, bias, columns, rows[chunk], vectors[chunk], positions[chunk], stages[chunk],
                  n_latents, n_writers).sweep(bar.update)
    bar.close()
    heap.trim()  # the passes' temporaries (tens of MB each) would otherwise stay resident
    values = torch.full((n_nodes,), float("nan"), dtype=torch.float64)
    if n_latents:
        values[:n_latents] = torch.cat(pre)
    values[-1] = target_value
    errors = torch.cartesian_prod(torch.arange(n_writers), torch.arange(n)) if n_writers else torch.zeros(0, 2).long()
    return Adjacency(matrix, bias, values, torch.cat(latents) if latents else torch.zeros(0, 3, dtype=torch.long),
                     torch.cat(activations) if activations else torch.zeros(0, dtype=torch.float64),
                     errors.reshape(-1, 2), n)


class _Backward:
    """The backward pass of `build_adjacency` for a chunk of rows whose positions are below ``span``:
    ``grad[r, q]`` is row r's derivative with respect to the residual stream at position q (q < span;
    later positions cannot reach an earlier one), at the point the pass has reached. Rows join when
    the pass reaches the stage they read."""

    def __init__(self, run: FrozenRun, matrix: Tensor, bias: Tensor, columns: dict[int, Tensor], rows: Tensor,
                 vectors: Tensor, positions: Tensor, stages: Tensor, n_latents: int, n_writers: int) -> None:
        self.run, self.matrix, self.bias, self.columns = run, matrix, bias, columns
        self.rows, self.vectors, self.positions, self.stages = rows, vectors, positions, stages
        self.n_latents, self.n_writers, self.n = n_latents, n_writers, len(run.tokens)
        self.span = int(positions.max()) + 1
        self.live = torch.zeros(0, dtype=torch.long)  # indices into rows/vectors, in grad's order
        self.grad = torch.zeros(0, self.span, vectors.shape[1], dtype=torch.float64)

    def join(self, stage: int) -> None:
        """Rows that read the residual stream at ``stage`` join the pass."""
        joining = torch.nonzero(self.stages == stage).flatten()
        if not len(joining):
            return
        grad = torch.zeros(len(joining), self.span, self.vectors.shape[1], dtype=torch.float64)
        grad[torch.arange(len(joining)), self.positions[joining]] = self.vectors[joining]
        self.live = torch.cat([self.live, joining])
        self.grad = torch.cat([self.grad, grad])

    def sweep(self, done: Callable[[], object] = lambda: None) -> None:
        """Go back from the last layer to the embeddings; ``done()`` after each layer."""
        run, parallel = self.run, self.run.layers[0].mlp_stage == 0
        for layer in range(max(self.n_writers, len(run.layers) - 1), -1, -1):
            self.join(2 * layer + 2)
            if layer >= len(run.layers):
                done()
                continue
            frozen = run.layers[layer]
            after = self.grad
            if layer < self.n_writers:
                self._mlp_writers(layer, after)
            if not parallel:
                self.grad = after + self._skip(frozen, after)
                self.join(2 * layer + 1)
                self.grad = self.grad + self._attention(frozen, self.grad)
            else:
                self.grad = after + self._skip(frozen, after) + self._attention(frozen, after)
            done()
        self.join(0)
        span = self.span
        embedding = run.token_embedding[:span] if run.position_embedding is None else \
            run.token_embedding[:span] + run.position_embedding[:span]
        tokens = self.n_latents + self.n_writers * self.n
        self._write(torch.arange(tokens, tokens + span), torch.einsum("rqd,qd->rq", self.grad, embedding))

    def _write(self, columns: Tensor, edges: Tensor) -> None:
        """Add ``edges`` to the live rows' ``columns`` (a cross-layer latent writes into several layers)."""
        self.matrix[self.rows[self.live][:, None], columns[None]] += edges

    def _mlp_writers(self, layer: int, grad: Tensor) -> None:
        """Edges from layer ``layer``'s latents and error nodes, and its decoder bias."""
        frozen, span = self.run.layers[layer], self.span
        seen = grad if frozen.mlp_gain is None else grad * frozen.mlp_gain[None, :span]
        written = frozen.mlp_out if frozen.tc is None else frozen.error
        start = self.n_latents + layer * self.n
        edges = torch.einsum("rqd,qd->rq", seen, written[:span])
        folded = [q for q in self.run.folded if q < span]  # constants: their error nodes send nothing
        self.bias[self.rows[self.live]] += edges[:, folded].sum(1)
        edges[:, folded] = 0
        self._write(torch.arange(start, start + span), edges)
        if frozen.tc is None:
            return
        tc = frozen.tc
        self.bias[self.rows[self.live]] += seen.sum(1) @ _float64(tc.b_dec) / tc.config.output_scale
        for source, decoder, scale in frozen.writes:  # a cross-layer transcoder's earlier layers write here too
            latents = self.run.layers[source].latents
            positions, indices = torch.nonzero(latents[:span], as_tuple=True)
            edges = torch.empty(len(seen), len(indices), dtype=torch.float64)
            for position in positions.unique().tolist():  # one matrix product per position
                here = torch.nonzero(positions == position).flatten()
                rows = _float64(decoder[indices[here]]) / scale
                edges[:, here] = seen[:, position] @ rows.T * latents[position, indices[here]]
            self._write(self.columns[source][:len(indices)], edges)  # node order: by position, then latent

    def _skip(self, frozen, grad: Tensor) -> Tensor:
        """What the layer's skip path (skip transcoders) sends back to its input; its norm bias's part to ``bias``."""
        if frozen.tc is None or frozen.skip is None:
            return torch.zeros_like(grad)
        span = self.span
        seen = grad if frozen.mlp_gain is None else grad * frozen.mlp_gain[None, :span]
        back = seen @ skip_map(frozen.tc)  # [rows, positions, d_model]
        self.bias[self.rows[self.live]] += (back @ frozen.mlp_norm.bias).sum(1)
        return frozen.mlp_norm.pullback(back) / frozen.mlp_norm.scale[None, :span, None]

    def _attention(self, frozen, grad: Tensor) -> Tensor:
        """What the layer's attention sends back to its input; its biases' part to ``bias``."""
        span = self.span
        seen = grad if frozen.attn_gain is None else grad * frozen.attn_gain[None, :span]
        ov, pattern = frozen.ov, frozen.pattern[:, :span, :span]
        rows, _, d = seen.shape
        heads, d_head = ov.W_O.shape[:2]
        out = (seen @ ov.W_O.flatten(0, 1).T).view(rows, span, heads, d_head)  # what each head's values receive
        self.bias[self.rows[self.live]] += seen.sum(1) @ ov.b_O + \
            (out * frozen.value_bias).sum(-1).flatten(1) @ pattern.sum(-1).T.flatten()
        mixed = torch.empty_like(out)  # [rows, sources, heads, d_head]
        for h in range(heads):
            mixed[:, :, h] = pattern[h].T @ out[:, :, h]
        # heads sharing a value head: sum what they send back before the (shared) W_V
        shared = mixed.view(rows, span, heads // ov.groups, ov.groups, d_head).sum(3)
        back = (shared.flatten(2) @ ov.W_V[::ov.groups].flatten(0, 1)).view(rows, span, d)
        return frozen.attn_norm.pullback(back) / frozen.attn_norm.scale[None, :span, None]


# -- circuit-tracer's influence, pruning and scores -----------------------------------------------------------


def normalize(matrix: Tensor) -> Tensor:
    """Absolute values, each row scaled to sum to 1 (rows of zeros stay zero)."""
    absolute = matrix.abs()
    return absolute.div_(absolute.sum(1, keepdim=True).clamp(min=1e-10))  # in place: one matrix, not two


def _row_totals(matrix: Tensor) -> Tensor:
    """Each row's sum of absolute values (at least 1e-10, as `normalize` divides by), by blocks of rows."""
    return torch.cat([block.abs().sum(1) for block in matrix.split(BLOCK)]).clamp(min=1e-10)


def influence(matrix: Tensor, output_weights: Tensor) -> Tensor:
    """``w @ (A + A² + …)`` for ``A = normalize(matrix)``: each node's total influence on the outputs
    along all paths. ``A`` is never formed whole (at 5,000 nodes it is 200 MB): ``x @ A`` is
    ``(x / row totals) @ |matrix|``, one block of `BLOCK` rows at a time."""
    totals = _row_totals(matrix)

    def step(x: Tensor) -> Tensor:
        scaled, out = x / totals, torch.zeros_like(x)
        for start in range(0, len(matrix), BLOCK):
            part = scaled[start:start + BLOCK]
            if part.any():
                out += part @ matrix[start:start + BLOCK].abs()
        return out

    current = step(output_weights)
    total = current.clone()
    with delayed_bar(desc="influence", unit="path step") as bar:  # one step per path length: seconds on a big graph
        for _ in range(len(matrix)):
            if not current.any():
                return total
            current = step(current)
            total += current
            bar.update()
    raise CircuitError("The graph has a cycle: influence does not converge.")


def node_influence(adjacency: Adjacency) -> Tensor:
    """Each node's total influence on the target (`influence`), computed once per adjacency
    (`scores` and `prune` both need it)."""
    if adjacency.cached_influence is None:
        adjacency.cached_influence = influence(adjacency.matrix, adjacency.output_weights)
    return adjacency.cached_influence


def cumulative_ranks(scores: Tensor) -> Tensor:
    """Each node's cumulative share of the total influence when nodes are sorted by influence,
    largest first (circuit-tracer's node ``influence`` field: small = most influential)."""
    ordered, order = torch.sort(scores, descending=True)
    ranks = torch.zeros_like(scores)
    ranks[order] = (torch.cumsum(ordered, 0) / ordered.sum().clamp(min=1e-300)).clamp(max=1.0)
    return ranks


def find_threshold(scores: Tensor, share: float, size: int | None = None) -> Tensor:
    """The smallest score kept when keeping the largest scores up to ``share`` of their total.

    ``scores`` may leave out zeros (they add nothing to the total): ``size`` is then the count with
    them, and where no share short of the last zero reaches ``share``, the threshold is 0."""
    size = len(scores) if size is None else size
    if not len(scores):
        return torch.zeros((), dtype=scores.dtype)
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, 0).div_(ordered.sum().clamp(min=1e-300))
    index = min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))), size - 1)
    return ordered[index] if index < len(ordered) else torch.zeros((), dtype=scores.dtype)


def prune(adjacency: Adjacency, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> tuple[Tensor, Tensor, Tensor]:
    """circuit-tracer's ``prune_graph``: ``(node_mask, edge_mask, cumulative ranks)``. Keeps the nodes
    holding ``node_threshold`` of the total influence (tokens and the target always), then the edges
    holding ``edge_threshold`` of the total edge influence, then drops latents and errors left without
    outgoing edges and latents without incoming ones.

    The edges are scored on the kept nodes' block of the matrix only (circuit-tracer zeroes the other
    rows and columns of a copy of the whole matrix, which gives the same scores): a few hundred rows
    instead of three copies of a [nodes, nodes] matrix."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise CircuitError(f"{name}={value!r} must be between 0 and 1 (a share of the total influence).")
    scores = node_influence(adjacency)
    node_mask = scores >= find_threshold(scores, node_threshold)
    inner = adjacency.token_slice.start  # latents and errors come first
    node_mask[inner:] = True
    kept = torch.nonzero(node_mask).flatten()
    block, weights = adjacency.matrix[kept[:, None], kept[None]], adjacency.output_weights[kept]
    edge_scores = normalize(block).mul_((influence(block, weights) + weights)[:, None])
    del block
    n = len(adjacency.matrix)
    positive = edge_scores[edge_scores > 0]
    edge_mask = torch.zeros(n, n, dtype=torch.bool)  # edges outside the block: dropped with their nodes below
    edge_mask[kept[:, None], kept[None]] = edge_scores >= find_threshold(positive, edge_threshold, size=n * n)
    drop_dead_ends(node_mask, edge_mask, adjacency)
    return node_mask, edge_mask, cumulative_ranks(scores)


def drop_dead_ends(node_mask: Tensor, edge_mask: Tensor, adjacency: Adjacency) -> None:
    """circuit-tracer's clean-up after pruning, in place: drop the edges of dropped nodes, latents and
    errors without outgoing edges and latents without incoming ones, until nothing changes."""
    inner, n_latents = adjacency.token_slice.start, adjacency.n_latents
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[:n_latents] &= edge_mask[:n_latents].any(1)
        if torch.equal(node_mask, before):
            return


def scores(adjacency: Adjacency) -> tuple[float, float]:
    """circuit-tracer's ``compute_graph_scores``: ``(replacement, completeness)``.

    Replacement: of the influence reaching the target from the nodes without inputs (tokens and
    errors), the share from tokens. Completeness: over every node weighted by its influence on the
    target (the target weighted 1), the share of its input that does not come from error nodes.
    """
    weights = adjacency.output_weights
    total = node_influence(adjacency)
    tokens, errors = total[adjacency.token_slice].sum(), total[adjacency.error_slice].sum()
    replacement = tokens / (tokens + errors).clamp(min=1e-300)
    explained = 1 - adjacency.matrix[:, adjacency.error_slice].abs().sum(-1) / _row_totals(adjacency.matrix)
    output = total + weights
    return float(replacement), float((explained * output).sum() / output.sum())
