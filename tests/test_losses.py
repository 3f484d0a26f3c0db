"""Checks of losses.py against hand-written formulas (softmax/log/sum), not against F.kl_div."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from errors import UserError
from losses import DistillationLoss, FullModelKLLoss, kl_elementwise_mean

B, C, D = 4, 5, 6


def hand_kl_elementwise(student: Tensor, target: Tensor, tau: float) -> Tensor:
    """p_t (log p_t - log p_s), averaged over batch x classes, no tau^2: torch's
    KLDivLoss() default as the NViT reference calls it."""
    p_t = torch.softmax(target / tau, dim=-1)
    p_s = torch.softmax(student / tau, dim=-1)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / student.numel()


def hand_soft_deit(dist: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """DeiT's soft term: summed KL times tau^2 divided by the number of logits."""
    p_t = torch.softmax(teacher / tau, dim=1)
    p_s = torch.softmax(dist / tau, dim=1)
    total = (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
    return total * tau * tau / dist.numel()


def hand_ce(logits: Tensor, target: Tensor) -> Tensor:
    return -torch.log(torch.softmax(logits, dim=1)).gather(1, target[:, None]).mean()


class CountingModel(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor):
        self.calls += 1
        return self.inner(x)


class TupleTeacher(nn.Module):
    """A two-head teacher, like a distilled DeiT in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, C)
        self.b = nn.Linear(D, C)

    def forward(self, x: Tensor):
        return self.a(x), self.b(x)


class MeanOfTuple(nn.Module):
    def __init__(self, inner: TupleTeacher) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.inner(x)
        return (a + b) / 2


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_batch():
    x = torch.randn(B, D)
    cls = torch.randn(B, C, requires_grad=True)
    dist = torch.randn(B, C, requires_grad=True)
    y = torch.randint(0, C, (B,))
    return x, cls, dist, y


# ---------------------------------------------------------------- DistillationLoss


def test_hard_distillation_matches_hand_computation() -> None:
    x, cls, dist, y = make_batch()
    teacher = nn.Linear(D, C)
    alpha = 0.3
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha, tau=1.0)
    loss = crit(x, (cls, dist), y)
    t_labels = teacher(x).argmax(1)
    # the label loss on the mean of the heads (the NViT reference), the teacher's on dist
    expected = hand_ce((cls + dist) / 2, y) * (1 - alpha) + hand_ce(dist, t_labels) * alpha
    torch.testing.assert_close(loss, expected)
    deit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha, 1.0, base_on="cls")
    expected = hand_ce(cls, y) * (1 - alpha) + hand_ce(dist, t_labels) * alpha
    torch.testing.assert_close(deit(x, (cls, dist), y), expected)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_distillation_matches_hand_computation(tau: float) -> None:
    x, cls, dist, y = make_batch()
    teacher = nn.Linear(D, C)
    alpha = 0.5
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau=tau)
    loss = crit(x, (cls, dist), y)
    with torch.no_grad():
        t = teacher(x)
    expected = hand_ce((cls + dist) / 2, y) * (1 - alpha) + hand_soft_deit(dist, t, tau) * alpha
    torch.testing.assert_close(loss, expected)


def test_soft_distillation_tau_squared_scaling() -> None:
    """At T=2 the term is 4 * (summed KL of the T-softened distributions) / numel."""
    x, cls, dist, y = make_batch()
    teacher = nn.Linear(D, C)
    crit2 = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 1.0, tau=2.0)
    with torch.no_grad():
        t = teacher(x)
    p_t = torch.softmax(t / 2, 1)
    p_s = torch.softmax(dist / 2, 1)
    raw = (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / dist.numel()
    torch.testing.assert_close(crit2(x, (cls, dist), y), 4.0 * raw)
    crit1 = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 1.0, tau=1.0)
    p_t1, p_s1 = torch.softmax(t, 1), torch.softmax(dist, 1)
    raw1 = (p_t1 * (torch.log(p_t1) - torch.log(p_s1))).sum() / dist.numel()
    torch.testing.assert_close(crit1(x, (cls, dist), y), raw1)


def test_none_with_tuple_takes_the_mean_of_the_heads() -> None:
    x, cls, dist, y = make_batch()
    crit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    torch.testing.assert_close(crit(x, (cls, dist), y), hand_ce((cls + dist) / 2, y))
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0, base_on="cls")
    torch.testing.assert_close(deit(x, (cls, dist), y), hand_ce(cls, y))


def test_none_with_single_tensor() -> None:
    x, cls, _, y = make_batch()
    crit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    torch.testing.assert_close(crit(x, cls, y), hand_ce(cls, y))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_alpha_zero_is_base_loss_exactly(kind: str) -> None:
    x, cls, dist, y = make_batch()
    crit = DistillationLoss(nn.CrossEntropyLoss(), nn.Linear(D, C), kind, 0.0, 2.0)
    assert torch.equal(crit(x, (cls, dist), y), nn.CrossEntropyLoss()((cls + dist) / 2, y))


def test_alpha_one_is_only_distill_term() -> None:
    x, cls, dist, y = make_batch()
    teacher = nn.Linear(D, C)
    hard = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 1.0, 1.0)
    loss = hard(x, (cls, dist), y)
    torch.testing.assert_close(loss, hand_ce(dist, teacher(x).argmax(1)))
    loss.backward()
    assert cls.grad is None or torch.count_nonzero(cls.grad) == 0
    assert dist.grad is not None and torch.count_nonzero(dist.grad) > 0


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_tuple_teacher_equals_mean_teacher(kind: str) -> None:
    x, cls, dist, y = make_batch()
    tt = TupleTeacher()
    a = DistillationLoss(nn.CrossEntropyLoss(), tt, kind, 0.7, 2.0)(x, (cls, dist), y)
    b = DistillationLoss(nn.CrossEntropyLoss(), MeanOfTuple(tt), kind, 0.7, 2.0)(
        x, (cls, dist), y
    )
    torch.testing.assert_close(a, b)


def test_teacher_gets_no_gradient_and_student_does() -> None:
    x, cls, dist, y = make_batch()
    teacher = nn.Linear(D, C)
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0)
    crit(x, (cls, dist), y).backward()
    assert teacher.weight.grad is None and teacher.bias.grad is None
    assert cls.grad is not None and dist.grad is not None


def test_mixup_soft_targets_with_soft_target_ce() -> None:
    imgs = torch.randn(B, 3, 2, 2)
    y = torch.randint(0, C, (B,))
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=C)
    imgs, soft = mixup(imgs, y)
    assert soft.shape == (B, C)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, C))
    cls = torch.randn(B, C, requires_grad=True)
    dist = torch.randn(B, C, requires_grad=True)
    alpha = 0.5
    crit = DistillationLoss(SoftTargetCrossEntropy(), teacher, "hard", alpha, 1.0)
    loss = crit(imgs, (cls, dist), soft)
    base = (-soft * torch.log(torch.softmax((cls + dist) / 2, 1))).sum(1).mean()
    expected = base * (1 - alpha) + hand_ce(dist, teacher(imgs).argmax(1)) * alpha
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(cls.grad).all()


def test_label_smoothing_base_criterion_with_tuple_none() -> None:
    x, cls, dist, y = make_batch()
    base = LabelSmoothingCrossEntropy(0.1)
    crit = DistillationLoss(base, None, "none", 0.5, 1.0)
    torch.testing.assert_close(crit(x, (cls, dist), y), base((cls + dist) / 2, y))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_without_teacher_is_user_error(kind: str) -> None:
    with pytest.raises(UserError, match="--teacher-model"):
        DistillationLoss(nn.CrossEntropyLoss(), None, kind, 0.5, 1.0)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_with_single_output_student_is_user_error(kind: str) -> None:
    x, cls, _, y = make_batch()
    crit = DistillationLoss(nn.CrossEntropyLoss(), nn.Linear(D, C), kind, 0.5, 1.0)
    with pytest.raises(UserError, match="--distillation-type"):
        crit(x, cls, y)


def test_unknown_distillation_type_is_user_error() -> None:
    with pytest.raises(UserError, match="--distillation-type"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "medium", 0.5, 1.0)
    with pytest.raises(UserError, match="--base-loss-head"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0, base_on="dist")


# ---------------------------------------------------------------- the KL term


@pytest.mark.parametrize("tau", [1.0, 3.0, 20.0])
def test_kl_matches_hand_formula(tau: float) -> None:
    s, t = torch.randn(B, C), torch.randn(B, C)
    torch.testing.assert_close(kl_elementwise_mean(s, t, tau), hand_kl_elementwise(s, t, tau))
    # the reference's own call, written with torch's module: KLDivLoss() at its default
    ref = nn.KLDivLoss(reduction="sum")(torch.log_softmax(s / tau, 1), torch.softmax(t / tau, 1))
    torch.testing.assert_close(kl_elementwise_mean(s, t, tau), ref / s.numel())


def test_kl_zero_for_identical_logits() -> None:
    s = torch.randn(B, C)
    torch.testing.assert_close(kl_elementwise_mean(s, s.clone(), 2.0), torch.tensor(0.0))


class _Fixed(nn.Module):
    """A 'teacher' that answers with given logits."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: Tensor) -> Tensor:
        return self.logits


@pytest.mark.parametrize("kind", ["kl", "soft"])
def test_kl_in_bf16_autocast_is_taken_in_fp32(kind: str) -> None:
    """Under CPU bf16 autocast (--amp on the CPU) the KL of bf16 logits is computed in fp32,
    as CUDA autocast computes log_softmax: it equals the fp32 KL of the same logits and is
    never negative (bf16 rounding made it about -20 at --kl_loss_coeff 1e5)."""
    torch.manual_seed(0)
    s = torch.randn(64, 1000).bfloat16()
    t = (s.float() + 1e-3 * torch.randn(64, 1000)).bfloat16()
    y = torch.zeros(64, dtype=torch.long)

    def loss(a: Tensor, b: Tensor) -> Tensor:
        if kind == "kl":
            return kl_elementwise_mean(a, b, 3.0)
        return DistillationLoss(nn.CrossEntropyLoss(), _Fixed(b), "soft", 1.0, 3.0)(a, (a, a), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = loss(s, t)
    exact = loss(s.float(), t.float())
    assert amp.dtype == torch.float32 and amp >= 0
    torch.testing.assert_close(amp, exact, rtol=1e-3, atol=1e-9)


# ---------------------------------------------------------------- FullModelKLLoss


def test_pruning_kl_total_matches_hand_computation() -> None:
    """The pruning objective: KL at T = 3 between the means of the two heads (student and
    full model), element-wise mean, no T^2, plus the DeiT loss; parts weighted."""
    x, cls, dist, y = make_batch()
    full = TupleTeacher()
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    crit = FullModelKLLoss(deit, full, kl_loss_coeff=1e5, original_loss_coeff=0.2, tau=3.0)
    loss = crit(x, (cls, dist), y)
    with torch.no_grad():
        f = MeanOfTuple(full)(x)
    kl = hand_kl_elementwise((cls + dist) / 2, f, 3.0)
    deit_val = hand_ce((cls + dist) / 2, y)
    # The hand KL sums in another order; x1e5 leaves ~1e-6 relative float32 noise (CPU-dependent).
    torch.testing.assert_close(loss, 1e5 * kl + 0.2 * deit_val, rtol=1e-5, atol=0)
    torch.testing.assert_close(crit.last_parts["loss_kl"], 1e5 * kl.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(crit.last_parts["loss_deit"], 0.2 * deit_val.detach())
    assert not crit.last_parts["loss_kl"].requires_grad


def test_finetune_kl_pairs_the_heads() -> None:
    """The finetuning objective: class head with class head, distillation head with
    distillation head, averaged, at the given temperature."""
    x, cls, dist, y = make_batch()
    full = TupleTeacher()
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    crit = FullModelKLLoss(deit, full, 1.0, 0.0, tau=20.0, per_head=True)
    with torch.no_grad():
        fa, fb = full(x)
    expected = (hand_kl_elementwise(cls, fa, 20.0) + hand_kl_elementwise(dist, fb, 20.0)) / 2
    torch.testing.assert_close(crit(x, (cls, dist), y), expected)


def test_finetune_kl_asks_a_revit_full_model_for_both_heads() -> None:
    import models
    full = models.build_model("deit_tiny_distilled_patch16_224",
                              dims=models.Dims(16, [2], [4], [4], [8]), img_size=16, patch_size=8,
                              num_classes=C)
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    FullModelKLLoss(deit, full, 1.0, 0.0, tau=1.0, per_head=True)
    assert not full.training and isinstance(full(torch.randn(2, 3, 16, 16)), tuple)


def test_full_model_kl_single_tensor_student_and_tuple_full_model() -> None:
    x, cls, _, y = make_batch()
    full = TupleTeacher()
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    crit = FullModelKLLoss(deit, full, 1.0, 0.0, tau=1.0)
    with torch.no_grad():
        f = MeanOfTuple(full)(x)
    torch.testing.assert_close(crit(x, cls, y), hand_kl_elementwise(cls, f, 1.0))


@pytest.mark.parametrize("switch", ["coeff", "disabled"])
def test_full_model_not_called_when_kl_is_off(switch: str) -> None:
    x, cls, dist, y = make_batch()
    full = CountingModel(nn.Linear(D, C))
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    crit = FullModelKLLoss(deit, full, kl_loss_coeff=0.0 if switch == "coeff" else 5.0,
                           original_loss_coeff=1.0, tau=1.0)
    crit.kl_enabled = switch == "coeff"
    loss = crit(x, (cls, dist), y)
    assert full.calls == 0
    torch.testing.assert_close(loss, hand_ce((cls + dist) / 2, y))
    assert crit.last_parts == {} if switch == "coeff" else float(crit.last_parts["loss_kl"]) == 0.0


def test_full_model_kl_coeff_zero_allows_no_full_model() -> None:
    x, cls, dist, y = make_batch()
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    crit = FullModelKLLoss(deit, None, 0.0, 1.0, 1.0)
    assert torch.isfinite(crit(x, (cls, dist), y))


def test_full_model_called_once_and_frozen() -> None:
    x, cls, dist, y = make_batch()
    inner = nn.Sequential(nn.Linear(D, C), nn.Dropout(0.5))
    full = CountingModel(inner)
    full.train()
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    crit = FullModelKLLoss(deit, full, 1.0, 1.0, 1.0)
    assert not full.training and not inner[1].training
    assert all(not p.requires_grad for p in full.parameters())
    crit.train()
    assert not full.training, "train() on the loss must not unfreeze the full model"
    crit(x, (cls, dist), y).backward()
    assert full.calls == 1
    assert all(p.grad is None for p in full.parameters())


def test_gradients_flow_to_student_only() -> None:
    x = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    student = TupleTeacher()
    full = nn.Linear(D, C)
    teacher = nn.Linear(D, C)
    deit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0)
    crit = FullModelKLLoss(deit, full, 1.0, 1.0, 2.0)
    crit(x, student(x), y).backward()
    for p in student.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    assert all(p.grad is None for p in full.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_kl_coeff_without_full_model_is_user_error() -> None:
    deit = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    with pytest.raises(UserError, match="--kl_loss_coeff"):
        FullModelKLLoss(deit, None, 0.5, 1.0, 1.0)
