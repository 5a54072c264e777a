"""The pointwise clip (kl_clip_mode="pointwise") equals the reference OPSD code's ``jsd_token_clip``: values and
gradients against autograd of a literal transcription of its loss, a hand-computed case, and its bookkeeping."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_opsd.losses import (
    clip_per_token,
    clipped_per_token_divergence,
    masked_token_mean,
    per_token_divergence,
    pointwise_clipped_divergence,
    sparse_topk_divergence,
)


def reference_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, token_clip):
    """siyan-zhao/OPSD ``OPSDTrainer.generalized_jsd_loss`` (reduction "batchmean", no top-k), transcribed as is."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if token_clip is not None:
        jsd = jsd.clamp(max=token_clip)
    mask = labels != -100
    jsd = jsd[mask]
    return jsd.sum() / mask.sum()


def random_case(seed=0, batch=3, length=5, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, length, vocab, generator=generator) * 2).requires_grad_()
    teacher = torch.randn(batch, length, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, -2:] = -100
    labels[2, -1] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("cap", [0.05, 0.2])
def test_values_and_gradients_equal_the_reference(beta, temperature, cap):
    student, teacher, labels = random_case()
    ours = masked_token_mean(
        clipped_per_token_divergence(student, teacher, beta, cap, "pointwise", temperature), labels != -100
    )
    reference = reference_generalized_jsd_loss(student, teacher, labels, beta, temperature, cap)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    (ours_grad,) = torch.autograd.grad(ours, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    assert reference_grad.abs().max() > 0
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-5, atol=1e-5)
    # The cap is active on some entries and not on others, so this compares more than two trivial cases.
    clipped = pointwise_clipped_divergence(student, teacher, beta, cap, temperature)
    assert 0 < clipped.clipped_entries.sum() < student[..., 0].numel() * student.size(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_without_a_cap_equals_the_unclipped_divergence_and_the_reference(beta):
    student, teacher, labels = random_case(seed=1)
    ours = masked_token_mean(clipped_per_token_divergence(student, teacher, beta, None, "pointwise"), labels != -100)
    torch.testing.assert_close(ours, reference_generalized_jsd_loss(student, teacher, labels, beta, 1.0, None))
    torch.testing.assert_close(ours, masked_token_mean(per_token_divergence(student, teacher, beta), labels != -100))


def test_hand_computed_forward_kl_three_tokens():
    # p_T = (0.7, 0.2, 0.1), p_S = (0.2, 0.5, 0.3); forward KL terms p_T log(p_T / p_S):
    # 0.7 log 3.5 = 0.877 (above the cap 0.05), 0.2 log 0.4 = -0.183, 0.1 log(1/3) = -0.110 (negative: kept).
    teacher = torch.tensor([0.7, 0.2, 0.1]).log()
    student = torch.tensor([0.2, 0.5, 0.3]).log().requires_grad_()
    clipped = pointwise_clipped_divergence(student, teacher, 0.0, 0.05)
    expected = 0.05 + 0.2 * math.log(0.4) + 0.1 * math.log(1 / 3)
    assert expected < 0  # the clipped value of a position can be negative
    torch.testing.assert_close(clipped.values, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clipped.unclipped, torch.tensor(expected - 0.05 + 0.7 * math.log(3.5)))
    torch.testing.assert_close(clipped.clipped_mass, torch.tensor(0.7 * math.log(3.5) - 0.05))
    assert clipped.clipped_entries.item() == 1
    # d/dz: p_S * sum_v k_v p_T(v) - k * p_T with k = (0, 1, 1): (0.2 * 0.3, 0.5 * 0.3 - 0.2, 0.3 * 0.3 - 0.1).
    (grad,) = torch.autograd.grad(clipped.values, student)
    torch.testing.assert_close(grad, torch.tensor([0.06, -0.05, -0.01]), rtol=1e-5, atol=1e-5)


def test_hand_computed_reverse_kl_three_tokens():
    # Reverse KL terms p_S log(p_S / p_T): 0.2 log(2/7) < 0, 0.5 log 2.5 = 0.458 (above the cap 0.4), 0.3 log 3 = 0.330.
    teacher = torch.tensor([0.7, 0.2, 0.1]).log()
    student = torch.tensor([0.2, 0.5, 0.3]).log().requires_grad_()
    clipped = pointwise_clipped_divergence(student, teacher, 1.0, 0.4)
    torch.testing.assert_close(
        clipped.values, torch.tensor(0.2 * math.log(2 / 7) + 0.4 + 0.3 * math.log(3)), rtol=1e-5, atol=1e-5
    )
    # d/dz_j = p_S(j) * (k_j (r_j + 1) - B), r = log(p_S / p_T), B = sum_v k_v p_S(v) (r_v + 1), k = (1, 0, 1).
    r_plus_one = [math.log(2 / 7) + 1, math.log(2.5) + 1, math.log(3) + 1]
    baseline = 0.2 * r_plus_one[0] + 0.3 * r_plus_one[2]
    expected = [0.2 * (r_plus_one[0] - baseline), 0.5 * (0 - baseline), 0.3 * (r_plus_one[2] - baseline)]
    (grad,) = torch.autograd.grad(clipped.values, student)
    torch.testing.assert_close(grad, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_differs_from_the_per_token_clamp():
    """The per-token clamp zeroes the whole position's gradient above the cap; the pointwise clip does not."""
    student, teacher, _ = random_case(seed=2)
    per_token = clip_per_token(per_token_divergence(student, teacher, 0.0), 0.05, "clamp")
    pointwise = clipped_per_token_divergence(student, teacher, 0.0, 0.05, "pointwise")
    assert (per_token >= 0).all() and (per_token <= 0.05).all()
    assert not torch.allclose(pointwise, per_token)
    (per_token_grad,) = torch.autograd.grad(per_token.sum(), student)
    (pointwise_grad,) = torch.autograd.grad(pointwise.sum(), student)
    assert per_token_grad.abs().sum() == 0  # every position here is above 0.05
    assert pointwise_grad.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_with_the_whole_vocabulary_equals_the_dense_pointwise_clip(beta):
    student, teacher, _ = random_case(seed=3)
    vocab = student.size(-1)
    teacher_log_probs, ids = teacher.log_softmax(-1).topk(vocab, dim=-1)
    sparse = sparse_topk_divergence(student, ids, teacher_log_probs, beta, pointwise_cap=0.1)
    dense = per_token_divergence(student, teacher, beta, pointwise_cap=0.1)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(sparse.sum(), student)[0], torch.autograd.grad(dense.sum(), student)[0],
        rtol=1e-5, atol=1e-5,
    )


def test_topk_caps_each_bucket_term():
    student, teacher, _ = random_case(seed=4)
    teacher_log_probs, ids = teacher.log_softmax(-1).topk(3, dim=-1)
    unclipped = sparse_topk_divergence(student, ids, teacher_log_probs, 0.0)
    clipped = sparse_topk_divergence(student, ids, teacher_log_probs, 0.0, pointwise_cap=0.05)
    assert (clipped <= unclipped + 1e-6).all() and (clipped < unclipped - 1e-3).any()
    assert (clipped <= 4 * 0.05 + 1e-6).all()  # at most K + 1 = 4 positive bucket terms, each at most the cap


def test_clip_modes_and_bad_arguments():
    student, teacher, _ = random_case(seed=5)
    for mode in ("clamp", "scale"):
        torch.testing.assert_close(
            clipped_per_token_divergence(student, teacher, 1.0, 0.3, mode),
            clip_per_token(per_token_divergence(student, teacher, 1.0), 0.3, mode),
        )
    with pytest.raises(ValueError, match="positive"):
        per_token_divergence(student, teacher, 1.0, pointwise_cap=0.0)
    with pytest.raises(ValueError, match="pointwise"):
        clip_per_token(per_token_divergence(student, teacher, 1.0), 0.3, "pointwise")
