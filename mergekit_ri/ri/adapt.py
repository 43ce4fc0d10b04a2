"""RI's adaptation of one expert (Ramesh et al., 2026; `shared/reference/ri.md`).

On each auxiliary batch x, for expert i with backbone θ* (trainable, from θ_i):
    L1 = KL( h_i(f(x; θ_i)) ‖ h_i(f(x; θ*)) )                     keep behaving like itself
    L2 = mean_{j≠i} KL( h_j(f(x; θ0)) ‖ h_j(f(x; θ*)) )             look like the base to others
    L  = L1 + α L2
Only θ* trains (AdamW); θ0, θ_i and every head stay frozen. The other heads are applied to what
the expert's own head receives (captured with a forward hook), so one backbone pass serves all
heads, whatever the architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .keys import RISettings  # the settings live with the cache keys (no torch there)

StepReport = Callable[[int, float, float], None]


def head_module_name(model: nn.Module, is_head: Callable[[str], bool]) -> str:
    """The module holding the task head: the common prefix of the head parameters' names."""
    names = [n for n, _ in model.named_parameters() if is_head(n)]
    if not names:
        raise UserError(
            f"RI needs a task head per expert and {type(model).__name__} has none (no parameter matches the heads "
            "filter): RI keeps each expert itself through its own head and like the base through the others'"
        )
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if not common:
        raise UserError(
            f"the head parameters {names[:3]} do not share one module; give RI a heads filter such as 'classifier.'"
        )
    return ".".join(common)


class HeadInput:
    """Captures what a model's head module receives on each forward pass."""

    def __init__(self, model: nn.Module, head_name: str) -> None:
        self.value: torch.Tensor | None = None
        self._handle = model.get_submodule(head_name).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self._handle.remove()


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax teacher ‖ softmax student), averaged over examples (and tokens)."""
    classes = teacher_logits.shape[-1]
    teacher = F.log_softmax(teacher_logits.reshape(-1, classes).float(), dim=-1)
    student = F.log_softmax(student_logits.reshape(-1, classes).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def ri_losses(
    student: nn.Module,
    student_input: HeadInput,
    own_teacher: nn.Module,
    base: nn.Module,
    base_input: HeadInput,
    other_heads: list[nn.Module],
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L2) for one batch."""
    with torch.no_grad():
        own_target = own_teacher(**batch).logits
        base(**batch)
        base_features = base_input.value
        other_targets = [head(base_features) for head in other_heads]
    own = student(**batch).logits
    features = student_input.value
    l1 = kl_teacher_student(own_target, own)
    if not other_heads:
        return l1, torch.zeros((), device=l1.device)
    l2 = torch.stack(
        [kl_teacher_student(t, head(features)) for t, head in zip(other_targets, other_heads)]
    ).mean()
    return l1, l2


def adapt_expert(
    expert: nn.Module,
    base: nn.Module,
    other_heads: list[nn.Module],
    head_name: str,
    batches: Iterable[dict[str, torch.Tensor]],
    settings: RISettings,
    device: torch.device,
    report: StepReport | None = None,
    label: str = "expert",
) -> nn.Module:
    """The adapted copy of `expert` (backbone trained, head untouched). Inputs are not modified.
    A non-finite loss or result is a UserError naming `label`: nothing diverged may be cached."""
    own_teacher = expert.to(device).eval()
    base = base.to(device).eval()
    student = copy.deepcopy(own_teacher).eval()  # eval: no dropout, so teacher = student at step 0
    heads = [h.to(device).eval() for h in other_heads]
    for module in (own_teacher, base, *heads):
        module.requires_grad_(False)
    head_prefix = head_name + "."
    trainable = []
    for name, param in student.named_parameters():
        param.requires_grad_(not name.startswith(head_prefix))
        if param.requires_grad:
            trainable.append(param)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    student_input, base_input = HeadInput(student, head_name), HeadInput(base, head_name)
    try:
        for step, batch in enumerate(batches, start=1):
            batch = {k: v.to(device) for k, v in batch.items()}
            l1, l2 = ri_losses(student, student_input, own_teacher, base, base_input, heads, batch)
            loss = l1 + settings.alpha * l2
            require_finite_loss(loss, label, step, settings.steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if report is not None:
                report(step, l1.item(), l2.item())
    finally:
        student_input.remove()
        base_input.remove()
    require_finite_weights(trainable, label)
    return student.requires_grad_(False)


def require_finite_loss(loss: torch.Tensor, label: str, step: int, steps: int) -> None:
    """Stop before a NaN/Inf loss reaches the weights (one host sync a step; a step costs far more)."""
    if not torch.isfinite(loss).item():
        raise UserError(
            f"RI adaptation of expert '{label}' diverged: the loss is {loss.item()} at step {step} "
            f"of {steps} (check the expert's weights and the auxiliary data, or lower lr)"
        )


def require_finite_weights(params: list[nn.Parameter], label: str) -> None:
    """The last optimizer step is never followed by a loss: check what it wrote before it is cached."""
    if params and not torch.stack([torch.isfinite(p).all() for p in params]).all().item():  # one sync
        raise UserError(
            f"RI adaptation of expert '{label}' diverged: its adapted weights hold NaN or Inf "
            "after the last step (lower lr)"
        )
