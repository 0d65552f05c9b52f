"""Parity of the objective with the published algorithms, computed independently in float64 NumPy:
DINO (Caron et al., 2021, Algorithm 1 and the multi-crop loss of its code), iBOT's patch loss as
DINOv2 weights it, KoLeo (Sablayrolles et al., 2018), centering, Sinkhorn-Knopp (SwAV/DINOv2)
and the EMA teacher. Then the gradient contract: nothing reaches the teacher, everything
trainable in the student gets some."""
import numpy as np
import pytest
import torch

from dinomx.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, TeacherCentering
from dinomx.model import build_models, ema_update
from dinomx.objective import SSLObjective
from tests.conftest import tiny_config

RNG = np.random.default_rng(0)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def reference_dino(student_views, teacher_views, center, tps, tpt):
    """DINO's multi-crop loss: every teacher global view against every other student view."""
    targets = [softmax((t - center) / tpt) for t in teacher_views]
    total, terms = 0.0, 0
    for iq, q in enumerate(targets):
        for v, s in enumerate(student_views):
            if v == iq:
                continue
            total += (-q * log_softmax(s / tps)).sum(-1).mean()
            terms += 1
    return total / terms


def t64(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_dino_loss_and_center_follow_algorithm_1():
    b, k, m = 6, 10, 0.9
    g1, g2, l1, l2, l3 = (RNG.normal(size=(b, k)) for _ in range(5))
    t1, t2 = RNG.normal(size=(b, k)), RNG.normal(size=(b, k))
    center = RNG.normal(size=(1, k)) * 0.1
    loss = DINOLoss(k, student_temp=0.1, center_momentum=m).double()
    loss.centering.center.copy_(t64(center))
    probs = list(loss.teacher_probs(t64(np.concatenate([t1, t2])), 0.04).chunk(2))

    expected_global = reference_dino([g1, g2], [t1, t2], center, 0.1, 0.04)
    expected_local = np.mean([(-softmax((t - center) / 0.04) * log_softmax(s / 0.1)).sum(-1).mean()
                              for t in (t1, t2) for s in (l1, l2, l3)])
    assert loss([t64(g1), t64(g2)], probs, skip_same_view=True).item() == pytest.approx(expected_global, rel=1e-6)  # the module run in float64 (.double()) against float64 NumPy
    assert loss([t64(view) for view in (l1, l2, l3)], probs, skip_same_view=False).item() == pytest.approx(expected_local, rel=1e-6)  # the module run in float64 (.double()) against float64 NumPy

    loss.update_center(t64(np.concatenate([t1, t2])))
    expected_center = m * center + (1 - m) * np.concatenate([t1, t2]).mean(0, keepdims=True)
    np.testing.assert_allclose(loss.centering.center.numpy(), expected_center, rtol=1e-6)  # the EMA centre, in float64 like the module


class Fixed(torch.nn.Module):
    """A stand-in network that answers fixed outputs, so the loss assembly alone is under test."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def test_objective_weighs_all_crop_pairs_as_dino_does():
    b, k, n_local = 4, 12, 3
    cfg = tiny_config(dino_head={"out_dim": k, "centering": "centering", "koleo_loss_weight": 0.0},
                      crops={"local_crops_number": n_local})
    student_global, student_local = RNG.normal(size=(2 * b, k)), RNG.normal(size=(n_local * b, k))
    teacher_global = RNG.normal(size=(2 * b, k))
    student = Fixed({"global_logits": t64(student_global), "local_logits": t64(student_local),
                     "global_cls": t64(RNG.normal(size=(2 * b, 8)))})
    teacher = Fixed({"global_logits": t64(teacher_global), "global_cls": t64(RNG.normal(size=(2 * b, 8)))})
    objective = SSLObjective(cfg).double()
    out = objective(student, teacher, {"global_crops": torch.zeros(2 * b, 3, 4, 4)}, teacher_temp=0.05)

    views = np.split(student_global, 2) + np.split(student_local, n_local)
    expected = reference_dino(views, np.split(teacher_global, 2), np.zeros((1, k)), cfg.dino_head.student_temp, 0.05)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)  # the module run in float64 (.double()) against float64 NumPy


def test_ibot_patch_loss_weighs_each_image_as_dinov2():
    k, tps = 7, 0.1
    masks = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    m = int(masks.sum())
    student, teacher = RNG.normal(size=(m, k)), softmax(RNG.normal(size=(m, k)))
    # DINOv2 forward_masked: per-patch cross-entropy, weight 1 / (masked patches of its image),
    # summed and divided by the number of images.
    owner = masks.nonzero()[:, 0].numpy()
    counts = masks.sum(1).numpy()
    per_patch = (-teacher * log_softmax(student / tps)).sum(-1)
    expected = (per_patch / counts[owner]).sum() / masks.shape[0]
    got = IBOTPatchLoss(k, student_temp=tps).double()(t64(student), t64(teacher), masks)
    assert got.item() == pytest.approx(expected, rel=1e-6)  # the module run in float64 (.double()) against float64 NumPy


def test_koleo_is_the_log_distance_to_the_nearest_neighbour():
    x = RNG.normal(size=(9, 5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    distances = np.linalg.norm(unit[:, None] - unit[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    expected = -np.log(distances.min(1) + 1e-8).mean()
    assert KoLeoLoss()(t64(x)).item() == pytest.approx(expected, rel=1e-6)


def test_sinkhorn_knopp_matches_the_dinov2_iteration():
    b, k, temp, iterations = 8, 5, 0.1, 3
    logits = RNG.normal(size=(b, k))
    q = np.exp(logits / temp).T
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * b
    expected = (q * b).T
    got = TeacherCentering(k, "sinkhorn_knopp", sinkhorn_iterations=iterations).double()(t64(logits), temp)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-6)  # each sample is a distribution


def test_ema_update_is_the_momentum_average():
    teacher, student = [t64(RNG.normal(size=(3, 2))), t64(RNG.normal(size=4))], [t64(RNG.normal(size=(3, 2))), t64(RNG.normal(size=4))]
    expected = [0.99 * t.numpy() + 0.01 * s.numpy() for t, s in zip(teacher, student)]
    ema_update(teacher, student, 0.99)
    for got, want in zip(teacher, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_gradients_reach_every_trainable_student_part_and_never_the_teacher(tiles):
    cfg = tiny_config(dino_head={"koleo_loss_weight": 0.1},
                      ibot={"loss_weight": 1.0, "mask_sample_probability": 1.0, "mask_ratio_min_max": [0.2, 0.4]})
    torch.manual_seed(0)
    student, teacher = build_models(cfg)
    objective = SSLObjective(cfg)
    b, grid = 4, cfg.crops.global_crops_size // cfg.student.patch_size
    masks = torch.zeros(2 * b, grid * grid, dtype=torch.bool)
    masks[:, : grid * grid // 3] = True
    batch = {"global_crops": torch.randn(2 * b, 3, 32, 32), "local_crops": torch.randn(2 * b, 3, 16, 16), "masks": masks}
    out = objective(student, teacher, batch, teacher_temp=0.04)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    silent = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert len(trainable) > 20 and not silent
