"""DINO, iBOT and KoLeo losses, centering and Sinkhorn-Knopp (their parity with the published
algorithms is test_loss_parity.py's)."""
import math

import pytest
import torch

from dinomx.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, RelationalDistillationLoss, TeacherCentering


def test_dino_loss_is_cross_entropy_and_skips_same_view():
    loss = DINOLoss(out_dim=4, student_temp=1.0)
    teacher = [torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]])]
    student = [torch.zeros(1, 4), torch.zeros(1, 4)]
    # Uniform student: cross-entropy against any one-hot target is log(4).
    assert loss(student, teacher, skip_same_view=True).item() == pytest.approx(math.log(4))
    # Student view 0 agrees with teacher view 0 only: skipping that pair leaves the mismatch.
    sharp = [torch.tensor([[20.0, 0, 0, 0]]), torch.tensor([[0, 20.0, 0, 0]])]
    assert loss(sharp, teacher, skip_same_view=True).item() > 10
    assert loss(sharp, teacher, skip_same_view=False).item() < loss(sharp, teacher, skip_same_view=True).item()


def test_center_tracks_teacher_mean_without_process_group():
    loss = DINOLoss(out_dim=3, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    assert torch.allclose(loss.centering.center, torch.tensor([[0.5, 0.5, 0.0]]))
    probs = loss.teacher_probs(torch.tensor([[1.0, 1.0, 1.0]]), teacher_temp=0.1)
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[0, 2] > probs[0, 0]  # centering removed what the batch already agrees on


def test_sinkhorn_knopp_balances_prototypes_without_a_process_group():
    centering = TeacherCentering(out_dim=4, mode="sinkhorn_knopp", sinkhorn_iterations=20)
    # Every sample prefers prototype 0: Sinkhorn spreads the batch over all prototypes anyway.
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4) + torch.eye(4) * 0.1
    probs = centering(logits, teacher_temp=0.1)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-4)
    assert torch.allclose(probs.sum(dim=0), torch.ones(4), atol=1e-2)
    assert probs.argmax(dim=1).tolist() == [0, 1, 2, 3]
    centering.update(logits)  # no centre for Sinkhorn
    assert centering.center.abs().sum() == 0


def test_koleo_spreads_features_and_is_safe_on_tiny_or_duplicate_batches():
    koleo = KoLeoLoss()
    spread = koleo(torch.eye(4))
    clustered = koleo(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]))
    assert clustered > spread
    assert koleo(torch.randn(1, 8)).item() == 0.0
    duplicates = koleo(torch.ones(3, 8))
    assert torch.isfinite(duplicates) and duplicates > clustered
    x = torch.randn(5, 8, requires_grad=True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all()


def test_ibot_loss_weights_each_image_equally():
    loss = IBOTPatchLoss(out_dim=3, student_temp=1.0)
    masks = torch.tensor([[True, False, False], [True, True, True]])
    teacher = torch.tensor([[1.0, 0, 0]] * 4)
    # Image 0's single patch is right, image 1's three patches are wrong.
    student = torch.tensor([[50.0, 0, 0], [0, 50.0, 0], [0, 50.0, 0], [0, 50.0, 0]])
    value = loss(student, teacher, masks)
    assert value.item() == pytest.approx((0.0 + 50.0) / 2, abs=1e-3)


def test_relational_distillation_is_the_kl_of_neighbourhoods_and_ignores_width_and_rotation():
    torch.manual_seed(0)
    teacher = torch.randn(6, 32)
    loss = RelationalDistillationLoss()
    # The published form, image by image: KL(p_i || q_i) over the other images, softmax of cosine / 0.1.
    student = torch.randn(6, 8, requires_grad=True)

    def neighbours(x, i):
        x = torch.nn.functional.normalize(x, dim=-1)
        others = [j for j in range(len(x)) if j != i]
        return torch.softmax(torch.stack([x[i] @ x[j] for j in others]) / 0.1, dim=0)

    expected = sum((neighbours(teacher, i) * (neighbours(teacher, i) / neighbours(student, i)).log()).sum()
                   for i in range(6)) / 6
    value = loss(student, [teacher])
    assert torch.allclose(value, expected, atol=1e-5)
    value.backward()
    assert student.grad.abs().sum() > 0
    # A student of another width whose space is the teacher's, rotated and scaled: nothing to learn.
    rotation = torch.linalg.qr(torch.randn(48, 48))[0][:, :32]
    assert loss(3 * teacher @ rotation.T, [teacher]).item() < 1e-5
    # Several teachers: the mean of their divergences.
    other = torch.randn(6, 16)
    assert torch.allclose(loss(teacher, [teacher, other]), loss(teacher, [other]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="teachers' features for the student's 6 images"):
        loss(teacher, [other[:4]])
