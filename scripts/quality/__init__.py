"""Helpers of `scripts/bench_quality.py`: an offline multi-task merge-quality benchmark.

data      tasks (real digits shipped in packages, transformed and procedural variants), the
          pretext mixture the base is pretrained on, and RI's auxiliary inputs
model     the tiny ViT: pretraining, probe heads, experts, evaluation
merging   recipes, merges through `mergekit_ri.merge`, λ grids chosen on validation
report    the table (Markdown, JSON, terminal) and the bar chart
"""
