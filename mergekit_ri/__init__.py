"""mergekit-ri: merge fine-tuned experts of one base model into one multi-task model."""

__version__ = "0.1.0"
