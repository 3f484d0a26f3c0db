"""Training objectives: DeiT's distillation loss and NViT's full-model KL objective.

Both wrap a base criterion (cross entropy, label smoothing or soft-target CE from
Mixup), so the same student code path serves plain, distilled, pruning and finetuning runs.
Their default meanings are the NViT reference's (NVlabs/NViT): the base loss is taken on
the mean of a distilled student's two heads, and the KL term is torch's `KLDivLoss()` with
its element-wise mean at a fixed temperature, without the tau^2 factor.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import UserError

StudentOutput = Union[Tensor, Sequence[Tensor]]

DISTILLATION_TYPES = ("none", "soft", "hard")
BASE_LOSS_HEADS = ("mean", "cls")  # mean of the two heads (NViT reference) or class head (DeiT)


def mean_of_heads(out: StudentOutput) -> Tensor:
    """Reduce a multi-head output to one tensor the way a distilled DeiT does at eval time."""
    if isinstance(out, (tuple, list)):
        return torch.stack(list(out), dim=0).mean(dim=0)
    return out


def kl_elementwise_mean(student_logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """KL(target || student) at temperature `tau`, averaged over every element (batch x
    classes), no tau^2: the NViT reference's `KLDivLoss()(log_softmax(s / T), softmax(t / T))`."""
    t = float(tau)
    # in fp32 as CUDA autocast runs log_softmax; CPU autocast keeps bf16, whose rounding
    # makes this tiny KL negative once scaled by the reference's --kl_loss_coeff 1e5
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_target = F.log_softmax(target_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_target, reduction="none", log_target=True).mean()


class DistillationLoss(nn.Module):
    """DeiT's objective: base loss plus a teacher loss on the distillation head.

    `base_on` "mean" applies the base criterion to the mean of the two heads (the NViT
    reference, both its pruning and ReViT scripts); "cls" to the class head (DeiT's code).
    """

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher_model: nn.Module | None,
        distillation_type: str,
        alpha: float,
        tau: float,
        base_on: str = "mean",
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
        if base_on not in BASE_LOSS_HEADS:
            raise UserError(f"--base-loss-head must be one of {', '.join(BASE_LOSS_HEADS)}, "
                            f"got {base_on!r}")
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        if teacher_model is not None:
            # Dropout/drop-path in the teacher would make its targets noisy.
            teacher_model.eval()
        self.distillation_type = distillation_type
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.base_on = base_on

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
        return mean_of_heads(self.teacher_model(inputs)).detach()

    def forward(self, inputs: Tensor, outputs: StudentOutput, labels: Tensor) -> Tensor:
        is_pair = isinstance(outputs, (tuple, list))
        if is_pair:
            base_out = mean_of_heads(outputs) if self.base_on == "mean" else outputs[0]
        else:
            base_out = outputs
        base_loss = self.base_criterion(base_out, labels)
        if self.distillation_type == "none":
            return base_loss

        if not is_pair:
            raise UserError(
                f"--distillation-type {self.distillation_type} needs a distilled model "
                "(one with a distillation token/head)"
            )
        dist_out = outputs[1]
        teacher = self._teacher_logits(inputs)

        if self.distillation_type == "soft":
            t = self.tau
            distill_loss = (
                F.kl_div(  # in fp32, as kl_elementwise_mean
                    F.log_softmax(dist_out.float() / t, dim=1),
                    F.log_softmax(teacher.float() / t, dim=1),
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
    """NViT's objective: stay close to the unpruned model while still fitting labels.

    total = kl_loss_coeff * KL + original_loss_coeff * deit_loss, KL by
    `kl_elementwise_mean` at temperature `tau`. `per_head` False compares the mean of the
    student's heads with the mean of the full model's (the reference's pruning run); True
    compares class head with class head and distillation head with distillation head and
    averages the two (its finetuning). `kl_enabled` switches the KL term off and on (the
    reference's pruning run adds it from the first prune step). A term that is off or has
    coefficient 0 is not computed, so its model is never run. `last_parts` holds the two
    weighted terms of the last call, detached, when both coefficients are non-zero.
    """

    def __init__(
        self,
        deit_loss: DistillationLoss,
        full_model: nn.Module | None,
        kl_loss_coeff: float,
        original_loss_coeff: float,
        tau: float,
        per_head: bool = False,
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
            if per_head and hasattr(full_model, "return_pair"):
                full_model.return_pair = True  # both heads in eval mode too
        self.kl_loss_coeff = float(kl_loss_coeff)
        self.original_loss_coeff = float(original_loss_coeff)
        self.tau = float(tau)
        self.per_head = per_head
        self.kl_enabled = True
        # Detached tensors (not floats) so logging does not force a device sync per step.
        self.last_parts: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> "FullModelKLLoss":
        """Switch mode but keep the frozen full model in eval."""
        super().train(mode)
        if self.full_model is not None:
            self.full_model.eval()
        return self

    def _kl(self, outputs: StudentOutput, full: StudentOutput) -> Tensor:
        pairs = (self.per_head and isinstance(outputs, (tuple, list))
                 and isinstance(full, (tuple, list)))
        if pairs:
            terms = [kl_elementwise_mean(s, f, self.tau) for s, f in zip(outputs, full)]
            return torch.stack(terms).mean()
        if self.per_head and isinstance(outputs, (tuple, list)):  # a one-head full model
            f = mean_of_heads(full)
            return torch.stack([kl_elementwise_mean(s, f, self.tau) for s in outputs]).mean()
        return kl_elementwise_mean(mean_of_heads(outputs), mean_of_heads(full), self.tau)

    def forward(self, inputs: Tensor, outputs: StudentOutput, labels: Tensor) -> Tensor:
        zero = mean_of_heads(outputs).new_zeros(())

        if self.kl_loss_coeff != 0 and self.kl_enabled:
            assert self.full_model is not None
            with torch.no_grad():
                full = self.full_model(inputs)
            kl = self.kl_loss_coeff * self._kl(outputs, full)
        else:
            kl = zero

        if self.original_loss_coeff != 0:
            deit = self.original_loss_coeff * self.deit_loss(inputs, outputs, labels)
        else:
            deit = zero

        if self.kl_loss_coeff and self.original_loss_coeff:  # one term alone is the loss
            self.last_parts = {"loss_kl": kl.detach(), "loss_deit": deit.detach()}
        return kl + deit


DISTILL_TARGETS = ("logits", "features")
FEATURE_DISTANCES = ("cosine", "mse")
DISTILL_TOKENS = ("pooled", "all")
FeaturePair = Sequence[Tensor]  # (pooled (B, E), patch tokens (B, N, E)): a model's feature_pair


def feature_distance(student: Tensor, target: Tensor, distance: str) -> Tensor:
    """Mean over vectors (the last axis is the feature) of 1 - cos(s, t), or the mean over
    every element of (s - t)^2; in fp32."""
    s, t = student.float(), target.float()
    if distance == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    return (s - t).pow(2).mean()


class FeatureDistillLoss(nn.Module):
    """Label-free objective: coeff * [D(pooled) + D(patch tokens) with tokens "all"], D a
    feature distance between the student's and the frozen full model's output features.

    No labels are read. `channels` (None: the student has the full model's width) are the
    full model's output channels the student's features hold, in order (a compact model
    after embedding pruning): the student's features are placed there and the rest are 0,
    which is what the masked student gave, so pruning and finetuning compare the same things.
    The term is on from the first step: the student differs from the full model through its
    stochastic layers (drop path, dropout) before the first prune step, which is what the
    gradient saliency then measures.
    """

    def __init__(self, full_model: nn.Module, coeff: float, distance: str = "cosine",
                 tokens: str = "pooled", channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if distance not in FEATURE_DISTANCES:
            raise UserError(f"--distill-loss must be one of {', '.join(FEATURE_DISTANCES)}, "
                            f"got {distance!r}")
        if tokens not in DISTILL_TOKENS:
            raise UserError(f"--distill-tokens must be one of {', '.join(DISTILL_TOKENS)}, "
                            f"got {tokens!r}")
        self.full_model = full_model.eval()
        for p in full_model.parameters():
            p.requires_grad_(False)
        full_model.return_features = True
        self.coeff, self.distance, self.tokens = float(coeff), distance, tokens
        self.register_buffer("channels", None if channels is None
                             else torch.as_tensor(list(channels), dtype=torch.long),
                             persistent=False)
        self.last_parts: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> "FeatureDistillLoss":
        """Switch mode but keep the frozen full model in eval."""
        super().train(mode)
        self.full_model.eval()
        return self

    def placed(self, t: Tensor, width: int) -> Tensor:
        """Student features in the full model's channels (zeros where it has none)."""
        if self.channels is None:
            if t.shape[-1] != width:
                raise UserError(f"the student's features have {t.shape[-1]} channels and the "
                                f"full model's {width}, and which of the full model's channels "
                                f"the student kept is not recorded (prune with nvit_prune.py, "
                                f"whose compact model records it)")
            return t
        out = t.new_zeros(*t.shape[:-1], width)
        return out.index_copy(-1, self.channels.to(t.device), t)

    def parts(self, student: FeaturePair, full: FeaturePair) -> dict[str, Tensor]:
        """The distance of the pooled features and (tokens "all") of the patch tokens, and
        the pooled features' mean cosine similarity (the score of a label-free run)."""
        width = full[0].shape[-1]
        pooled = self.placed(student[0], width)
        out = {"pooled": feature_distance(pooled, full[0], self.distance),
               "cos": F.cosine_similarity(pooled.float(), full[0].float(), dim=-1).mean()}
        if self.tokens == "all":
            out["tokens"] = feature_distance(self.placed(student[1], width), full[1],
                                             self.distance)
        return out

    def total(self, parts: dict[str, Tensor]) -> Tensor:
        """coeff * (pooled distance + tokens distance)."""
        return self.coeff * (parts["pooled"] + parts.get("tokens", 0.0))

    def forward(self, inputs: Tensor, outputs: FeaturePair, labels: Tensor | None = None
                ) -> Tensor:
        with torch.no_grad():
            full = self.full_model(inputs)
        p = self.parts(outputs, full)
        if "tokens" in p:
            self.last_parts = {"loss_pooled": self.coeff * p["pooled"].detach(),
                               "loss_tokens": self.coeff * p["tokens"].detach()}
        return self.total(p)
