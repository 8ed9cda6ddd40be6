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
model; the exact decomposition), `graph` (`CircuitGraph`: path search, paths, JSON and
circuit-tracer exports), `attribution` (targets and `attribute`).
"""

from .attribution import LatentTarget, LogitTarget, Target, attribute
from .graph import EXPANDABLE, FORMAT, KINDS, VERSION, CircuitGraph, Contribution, Edge, Node
from .replay import ATTENTION_OV, CircuitError, FrozenRun

__all__ = ["ATTENTION_OV", "EXPANDABLE", "FORMAT", "KINDS", "VERSION", "CircuitError", "CircuitGraph", "Contribution",
           "Edge", "FrozenRun", "LatentTarget", "LogitTarget", "Node", "Target", "attribute"]
