"""Circuits: weights-based attribution through transcoders, and path search.

Dunefsky, Chlenski & Nanda (2024), "Transcoders Find Interpretable LLM Feature Circuits". Freeze
the attention patterns and the norms' scales (RMSNorm/LayerNorm denominators) at their values on a
prompt; the model is then linear from the residual stream's writers to every reader. A transcoder
latent's pre-activation, or a logit (difference), splits **exactly** into direct contributions:

- upstream transcoder latents at the same position: activation × the input-invariant product of
  the upstream decoder row and the downstream encoder row through the norm's weight (and its
  centering, for LayerNorm), times the frozen norm scale;
- attention heads: head h of layer l moving position q's residual stream to position p through
  its OV circuit, weighted by the pattern A[h, p, q]. A head node is linear, so it splits in turn
  into what position q's residual stream held before layer l;
- token embeddings (and learned position embeddings, GPT-2), biases (attention, the transcoder's
  b_dec, the latent's b_enc and norm biases, final norm / unembedding), skip paths (linear
  nodes too), each transcoder's error term (MLP output − transcoder output) and the whole MLP
  output of layers without a transcoder.

Every edge reports its weight as ``invariant × dependent``: the input-invariant factor (the source's
vector — a decoder row, an embedding, a bias — dotted with the reader's weights-only vector) and
the input-dependent one (the source's activation × frozen norm scales × attention weights).

A latent node's value is its pre-activation. Its own encoder bias (plus its pre-MLP norm's bias,
for LayerNorm) is one of its predecessors, a bias node, so the contributions into every node sum to
its value; without that node they sum to the pre-activation minus those biases. An active latent's
activation equals its pre-activation (ReLU, TopK, JumpReLU), so replacing a latent by its
predecessors preserves the total of every path through it.

Modules: `replay` (one forward pass, nnsight with eager attention so the patterns are returned;
the residual stream replayed in float64 from the modules' own weights and checked against the
model; the exact decomposition), `adjacency` (the full graph of every active latent, error node
and token as a matrix of direct effects, and circuit-tracer's influence, pruning and scores),
`graph` (`CircuitGraph`: path search, paths, scores, pruning, files), `export` (circuit-tracer's
graph files), `attribution` (targets and `attribute`).

Gemma 2 and 3 work too: their post-attention and post-MLP norms are frozen like the pre-norms,
the token embedding (scaled by sqrt(d_model)) is the first block's input, and with final logit
soft-capping (``cap · tanh(logit / cap)``) a logit target is the logit *before* the cap, which is
linear in the residual stream (the capped one is a monotone function of it).
"""

from .attribution import LatentTarget, LogitTarget, Target, attribute
from .adjacency import Adjacency
from .graph import EXPANDABLE, FORMAT, GRAPH_FORMATS, KINDS, VERSION, CircuitGraph, Contribution, Edge, GraphFileError, \
    Node, Scores
from .replay import ATTENTION_OV, CircuitError, FrozenRun

__all__ = ["ATTENTION_OV", "EXPANDABLE", "FORMAT", "GRAPH_FORMATS", "KINDS", "VERSION", "Adjacency", "CircuitError",
           "CircuitGraph", "Contribution", "Edge", "FrozenRun", "GraphFileError", "LatentTarget", "LogitTarget", "Node",
           "Scores", "Target", "attribute"]
