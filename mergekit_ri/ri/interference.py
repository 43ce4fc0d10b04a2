"""Cross-task interference ξ of a merged model, measured on the auxiliary data (report only).

ξ = Σ_i E_x KL( h_i(f(x; θ_i)) ‖ h_i(f(x; θ_merged)) ): how far the merge drifts from each
expert, seen through that expert's own head. The paper uses it for analysis and shows that
tuning merge coefficients by it hurts, so ri-merge only prints it (`-v`), never optimises it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..heads import load_with_head
from ..io.sources import ModelSource
from .adapt import kl_teacher_student
from .data import AuxiliaryData


def interference(
    merged: Path,
    experts: list[ModelSource],
    model_class,
    aux: AuxiliaryData,
    device: torch.device,
    batches: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """ξ of the merged folder (with heads/) against the original experts."""
    inputs = list(aux.batches(batch_size, batches, seed))
    total = 0.0
    with torch.no_grad():
        for source in experts:
            expert = model_class.from_pretrained(source.folder, use_safetensors=True).to(device).eval()
            merged_model = load_with_head(merged, source.label, model_class).to(device).eval()
            drift = [
                kl_teacher_student(
                    expert(**_to(b, device)).logits, merged_model(**_to(b, device)).logits
                ).item()
                for b in inputs
            ]
            total += sum(drift) / len(drift)
    return total


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
