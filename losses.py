"""Training objectives: DeiT's distillation loss and NViT's full-model KL objective.

Both wrap a base criterion (cross entropy, label smoothing or soft-target CE from
Mixup), so the same student code path serves plain, distilled and pruning runs.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import UserError

StudentOutput = Union[Tensor, Sequence[Tensor]]

DISTILLATION_TYPES = ("none", "soft", "hard")


def _mean_of_heads(out: StudentOutput) -> Tensor:
    """Reduce a multi-head output to one tensor the way a distilled DeiT does at eval time."""
    if isinstance(out, (tuple, list)):
        return torch.stack(list(out), dim=0).mean(dim=0)
    return out


def kl_divergence(student_logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """KL(target || student) at temperature ``tau``, averaged over the batch.

    The ``tau**2`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al.), so the loss coefficient need not be retuned when tau changes.
    """
    t = float(tau)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_target = F.log_softmax(target_logits / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_target, reduction="batchmean", log_target=True)
    return kl * (t * t)


class DistillationLoss(nn.Module):
    """DeiT's objective: base loss on the class head plus a teacher loss on the dist head."""

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher_model: nn.Module | None,
        distillation_type: str,
        alpha: float,
        tau: float,
    ) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise UserError(
                f"--distillation-type must be one of {', '.join(DISTILLATION_TYPES)}, "
                f"got {distillation_type!r}"
            )
        if distillation_type != "none" and teacher_model is None:
            raise UserError(
                f"--distillation-type {distillation_type} needs a teacher: pass --teacher-model"
            )
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        if teacher_model is not None:
            # Dropout/drop-path in the teacher would make its targets noisy.
            teacher_model.eval()
        self.distillation_type = distillation_type
        self.alpha = float(alpha)
        self.tau = float(tau)

    def train(self, mode: bool = True) -> "DistillationLoss":
        """Switch mode but keep the teacher in eval, whatever the caller does to the loss."""
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()
        return self

    @torch.no_grad()
    def _teacher_logits(self, inputs: Tensor) -> Tensor:
        """Teacher prediction, with a distilled (two-head) teacher reduced to its head mean."""
        assert self.teacher_model is not None
        return _mean_of_heads(self.teacher_model(inputs)).detach()

    def forward(self, inputs: Tensor, outputs: StudentOutput, labels: Tensor) -> Tensor:
        is_pair = isinstance(outputs, (tuple, list))
        if self.distillation_type == "none":
            if is_pair:
                # Both heads learn the labels so that their eval-time mean is meaningful.
                losses = [self.base_criterion(o, labels) for o in outputs]
                return torch.stack(losses).mean()
            return self.base_criterion(outputs, labels)

        if not is_pair:
            raise UserError(
                f"--distillation-type {self.distillation_type} needs a distilled model "
                "(one with a distillation token/head)"
            )
        cls_out, dist_out = outputs[0], outputs[1]
        base_loss = self.base_criterion(cls_out, labels)
        teacher = self._teacher_logits(inputs)

        if self.distillation_type == "soft":
            t = self.tau
            distill_loss = (
                F.kl_div(
                    F.log_softmax(dist_out / t, dim=1),
                    F.log_softmax(teacher / t, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (t * t)
                / dist_out.numel()
            )
        else:
            distill_loss = F.cross_entropy(dist_out, teacher.argmax(dim=1))

        return base_loss * (1.0 - self.alpha) + distill_loss * self.alpha


class FullModelKLLoss(nn.Module):
    """NViT's pruning objective: stay close to the unpruned model while still fitting labels.

    total = kl_loss_coeff * KL(full || student) + original_loss_coeff * deit_loss.
    A term whose coefficient is 0 is not computed, so its model is never run.
    """

    def __init__(
        self,
        deit_loss: DistillationLoss,
        full_model: nn.Module | None,
        kl_loss_coeff: float,
        original_loss_coeff: float,
        tau: float,
    ) -> None:
        super().__init__()
        if kl_loss_coeff > 0 and full_model is None:
            raise UserError(
                "--kl_loss_coeff > 0 needs the full (unpruned) model: "
                "pass --pretrained or --pretrained-path"
            )
        self.deit_loss = deit_loss
        self.full_model = full_model
        if full_model is not None:
            full_model.eval()
            for p in full_model.parameters():
                p.requires_grad_(False)
        self.kl_loss_coeff = float(kl_loss_coeff)
        self.original_loss_coeff = float(original_loss_coeff)
        self.tau = float(tau)
        # Detached tensors (not floats) so logging does not force a device sync per step.
        self.last_parts: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> "FullModelKLLoss":
        """Switch mode but keep the frozen full model in eval."""
        super().train(mode)
        if self.full_model is not None:
            self.full_model.eval()
        return self

    def forward(self, inputs: Tensor, outputs: StudentOutput, labels: Tensor) -> Tensor:
        student = _mean_of_heads(outputs)
        zero = student.new_zeros(())

        if self.kl_loss_coeff != 0:
            assert self.full_model is not None
            with torch.no_grad():
                full = _mean_of_heads(self.full_model(inputs)).detach()
            kl = kl_divergence(student, full, self.tau)
        else:
            kl = zero

        if self.original_loss_coeff != 0:
            deit = self.deit_loss(inputs, outputs, labels)
        else:
            deit = zero

        self.last_parts = {"kl": kl.detach(), "deit": deit.detach()}
        return self.kl_loss_coeff * kl + self.original_loss_coeff * deit
