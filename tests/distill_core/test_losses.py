"""Each loss term against values computed by hand."""

import math

import torch

from distill_core.losses import L_KD, L_align_attn, L_align_hidden, L_task


def test_L_task_is_cross_entropy_over_masked_positions_only():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[1, 1, 0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert math.isclose(L_task(logits, labels, mask).item(), expected, rel_tol=1e-6)


def test_L_KD_is_temperature_scaled_kl_times_t_squared():
    s = torch.tensor([[[1.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0]]])
    T = 2.0
    ps = torch.softmax(s / T, -1)[0, 0]
    pt = torch.softmax(t / T, -1)[0, 0]
    kl = float((pt * (pt.log() - ps.log())).sum())
    assert math.isclose(L_KD(s, t, torch.ones(1, 1), T).item(), kl * T * T, rel_tol=1e-6)
    assert L_KD(t, t, torch.ones(1, 1), T).item() == 0.0


def test_L_align_hidden_is_mse_over_masked_positions():
    student = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert math.isclose(L_align_hidden(student, teacher, mask).item(), (1 + 4) / 2)


def test_normalized_L_align_hidden_divides_by_the_teachers_mean_square():
    student = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[2.0, 2.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 0]])
    plain = L_align_hidden(student, teacher, mask)
    assert math.isclose(plain.item(), (1 + 0) / 2)
    assert math.isclose(L_align_hidden(student, teacher, mask, normalized=True).item(), 0.5 / 4.0)
    # scale invariance: teacher and student both x10 -> the same normalized value
    assert math.isclose(L_align_hidden(10 * student, 10 * teacher, mask, normalized=True).item(),
                        0.5 / 4.0, rel_tol=1e-6)


def test_L_align_attn_is_mse_per_head_over_valid_pairs():
    s = torch.zeros(1, 2, 1, 2)
    t = torch.zeros(1, 2, 1, 2)
    s[0, 0, 0] = torch.tensor([1.0, 0.0])
    t[0, 0, 0] = torch.tensor([0.5, 0.5])   # head 0: errors 0.25, 0.25
    s[0, 1, 0] = torch.tensor([0.0, 1.0])   # head 1 equal to teacher
    t[0, 1, 0] = torch.tensor([0.0, 1.0])
    mask = torch.ones(1, 1, 2)
    assert math.isclose(L_align_attn(s, t, mask).item(), (0.25 + 0.25 + 0 + 0) / 4)
    mask[0, 0, 1] = 0  # the second key does not count
    assert math.isclose(L_align_attn(s, t, mask).item(), (0.25 + 0) / 2)


def test_empty_masks_give_zero_not_nan():
    zeros = torch.zeros(1, 2)
    assert L_task(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), zeros).item() == 0.0
    assert L_KD(torch.randn(1, 2, 3), torch.randn(1, 2, 3), zeros, 2.0).item() == 0.0


def test_task_and_kd_with_task_rows_beyond_the_distilled_rows_is_the_autograd_formula():
    """The fused pass on logits whose last rows are task positions that are not distilled
    (nk < n: an answer token inside a multi-token chunk): the same loss and gradient as
    L_task + L_KD through autograd."""
    from distill_core.losses import task_and_kd

    torch.manual_seed(0)
    n, nk, v, t = 9, 6, 11, 2.0
    logits = torch.randn(n, v, requires_grad=True)
    teacher = torch.randn(nk, v)
    task_rows, labels = torch.tensor([1, 4, 6, 8]), torch.tensor([3, 0, 7, 2])
    loss, l_task, l_kd = task_and_kd(logits, teacher / t, True, task_rows, labels, t, 0.7, 1.3)
    loss.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ones = torch.ones(1, nk)
    ref_task = L_task(ref_logits[task_rows][None], labels[None], torch.ones(1, 4))
    ref_kd = L_KD(ref_logits[:nk][None], teacher[None], ones, t)
    (0.7 * ref_task + 1.3 * ref_kd).backward()
    assert torch.allclose(l_task, ref_task) and torch.allclose(l_kd, ref_kd)
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)
