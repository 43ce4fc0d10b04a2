"""Which tensors the data-free spectral methods solve, by name and shape.

WUDI, TSV-M and Iso-C/CTS reason about a 2-D weight as a linear map `[out, in]` (nn.Linear
layout) whose task vectors span that layer's inputs. That holds for attention and MLP
projections; it does not for embedding tables and output heads, whose rows are per-token
lookups (a rank-truncated or input-subspace solve would discard most per-token updates), nor
for 1-D norms and biases. The official codes keep such tensors at the base (WUDI's ViT code,
FusionBench's causal-LM ports) or take the plain mean of the task vectors (TSV-M, Iso-C/CTS,
OptMerge); the methods say which.
"""

from __future__ import annotations

from ..lazy import torch

# substrings of the names of attention / MLP projection weights across HF and OpenCLIP models
PROJECTION_MARKERS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "query",
    "key",
    "value",
    "dense",
    "fc1",
    "fc2",
    "c_attn",
    "c_proj",
    "c_fc",
    "out_proj",
    "in_proj",
)
# token / position embeddings and output heads (Llama, GPT-2, BERT, CLIP, T5-style names)
EMBEDDING_MARKERS = ("embed", "lm_head", "wte", "wpe")


def is_embedding(name: str) -> bool:
    """Embedding tables and output heads: rows indexed by token, not a map over features."""
    lowered = name.lower()
    return any(marker in lowered for marker in EMBEDDING_MARKERS)


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """A 2-D weight that is not an embedding or head: what `scope: all_2d` and TSV/Iso solve."""
    return tensor.dim() == 2 and not is_embedding(name)


def is_projection(name: str, tensor: torch.Tensor) -> bool:
    """An attention or MLP projection weight: what `scope: linear` (WUDI's official code) solves."""
    lowered = name.lower()
    return is_matrix(name, tensor) and any(marker in lowered for marker in PROJECTION_MARKERS)
