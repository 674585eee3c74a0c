"""Values and gradients of the pure loss functions in fairseq_kd.losses."""

import math

import pytest
import torch

from fairseq_kd import losses
from tests import spec_vectors as sv


def _log(p):
    return torch.tensor(p, dtype=torch.float64).log()


# One position, V = 3: p_s = [.5, .25, .25], p_t = [.25, .5, .25], gold = 0.
HAND_STUDENT = _log([[[0.5, 0.25, 0.25]]])
HAND_TEACHER = _log([[[0.25, 0.5, 0.25]]])
HAND_TARGET = torch.tensor([[0]])


def test_label_smoothed_nll_by_hand():
    # nll = ln 2; eps_i = 0.1 / 2 = 0.05;
    # loss = 0.85 * ln2 + 0.05 * (ln2 + ln4 + ln4) = 1.1 * ln2
    loss, nll = losses.label_smoothed_nll(HAND_STUDENT, HAND_TARGET, padding_idx=99, epsilon=0.1)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-6)
    assert loss.item() == pytest.approx(1.1 * math.log(2), rel=1e-6)


def test_label_smoothed_nll_zero_epsilon_is_nll():
    loss, nll = losses.label_smoothed_nll(HAND_STUDENT, HAND_TARGET, padding_idx=99, epsilon=0.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert nll.item() == loss.item()


def test_kl_divergence_by_hand():
    # KL = .25 ln(.25/.5) + .5 ln(.5/.25) + 0 = 0.25 ln 2
    kl = losses.kl_divergence(HAND_STUDENT, HAND_TEACHER, HAND_TARGET, padding_idx=99)
    assert kl.item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_kl_divergence_with_temperature_by_hand():
    # tau = 2 softens p ∝ sqrt(p): p_s ∝ [1/sqrt2, 1/2, 1/2], p_t ∝ [1/2, 1/sqrt2, 1/2]
    r = 1 / math.sqrt(2)
    z = r + 1.0
    ps = [r / z, 0.5 / z, 0.5 / z]
    pt = [0.5 / z, r / z, 0.5 / z]
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    kl = losses.kl_divergence(HAND_STUDENT, HAND_TEACHER, HAND_TARGET, padding_idx=99, temperature=2.0)
    assert kl.item() == pytest.approx(expected, rel=1e-6)


def test_spec_vectors():
    student, teacher, target = sv.spec_batch()
    loss, nll = losses.label_smoothed_nll(student, target, sv.PAD, 0.1)
    assert loss.item() == pytest.approx(sv.LS_NLL_EPS_0_1, rel=1e-6)
    assert nll.item() == pytest.approx(sv.NLL, rel=1e-6)
    kl1 = losses.kl_divergence(student, teacher, target, sv.PAD)
    kl2 = losses.kl_divergence(student, teacher, target, sv.PAD, temperature=2.0)
    assert kl1.item() == pytest.approx(sv.WORD_KD_KL_TAU_1, rel=1e-6)
    assert kl2.item() == pytest.approx(sv.WORD_KD_KL_TAU_2, rel=1e-6)


def test_spec_vectors_float32_and_half_inputs():
    student, teacher, target = sv.spec_batch(torch.float32)
    kl = losses.kl_divergence(student, teacher, target, sv.PAD)
    assert kl.dtype == torch.float32
    assert kl.item() == pytest.approx(sv.WORD_KD_KL_TAU_1, rel=1e-5)
    # fp16 logits are upcast before the softmax
    kl16 = losses.kl_divergence(student.half(), teacher.half(), target, sv.PAD)
    assert kl16.dtype == torch.float32
    assert kl16.item() == pytest.approx(sv.WORD_KD_KL_TAU_1, rel=2e-3)


def test_padding_is_ignored():
    student, teacher, target = sv.spec_batch()
    garbage = student.clone()
    garbage[1, 3] = 1e3  # the pad position
    assert losses.kl_divergence(garbage, teacher, target, sv.PAD).item() == pytest.approx(
        losses.kl_divergence(student, teacher, target, sv.PAD).item(), rel=1e-12
    )
    assert losses.label_smoothed_nll(garbage, target, sv.PAD, 0.1)[0].item() == pytest.approx(
        losses.label_smoothed_nll(student, target, sv.PAD, 0.1)[0].item(), rel=1e-12
    )


def test_identical_teacher_gives_zero_kl():
    student, _, target = sv.spec_batch()
    assert losses.kl_divergence(student, student.clone(), target, sv.PAD).item() == pytest.approx(0.0, abs=1e-12)
    # shifting logits by a constant does not change the distribution
    assert losses.kl_divergence(student, student + 3.0, target, sv.PAD).item() == pytest.approx(0.0, abs=1e-10)


def test_teacher_with_zero_probabilities_is_finite():
    student, teacher, target = sv.spec_batch()
    teacher[..., 5:] = float("-inf")
    kl = losses.kl_divergence(student, teacher, target, sv.PAD)
    assert torch.isfinite(kl)
    lps = torch.log_softmax(student, -1)
    lpt = torch.log_softmax(teacher[..., :5], -1)
    manual = (lpt.exp() * (lpt - lps[..., :5])).sum(-1) * target.ne(sv.PAD)
    assert kl.item() == pytest.approx(manual.sum().item(), rel=1e-10)


def test_word_kd_loss_combines_terms():
    student, teacher, target = sv.spec_batch()
    for tau, scale in ((1.0, True), (2.0, True), (2.0, False)):
        loss, nll, kd = losses.word_kd_loss(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, 0.1, 0.3, tau, scale)
        ls, nll_ref = losses.label_smoothed_nll(student, target, sv.PAD, 0.1)
        kl = losses.kl_divergence(student, teacher, target, sv.PAD, tau)
        factor = tau**2 if scale else 1.0
        assert kd.item() == pytest.approx(kl.item(), rel=1e-12)
        assert nll.item() == pytest.approx(nll_ref.item(), rel=1e-12)
        assert loss.item() == pytest.approx(0.7 * ls.item() + 0.3 * factor * kl.item(), rel=1e-12)
    loss, _, kd = losses.word_kd_loss(student, None, target, sv.PAD, 0.1, 0.3)
    assert kd is None and loss.item() == pytest.approx(sv.LS_NLL_EPS_0_1, rel=1e-6)


def test_top1_agreement():
    student, teacher, target = sv.spec_batch()
    same = student.argmax(-1).eq(teacher.argmax(-1)) & target.ne(sv.PAD)
    assert losses.top1_agreement(student, teacher, target, sv.PAD).item() == same.sum().item()
    assert losses.top1_agreement(student, student, target, sv.PAD).item() == 7


def test_log_mean_exp_is_probability_average():
    a = torch.log_softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    avg = losses.log_mean_exp(torch.stack([a, b]))
    assert torch.allclose(avg.exp(), (a.exp() + b.exp()) / 2)
    assert torch.allclose(losses.log_mean_exp(a.unsqueeze(0)), a)


def test_gradcheck_label_smoothed_nll_and_kl():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 6, dtype=torch.float64)
    target = torch.tensor([[2, 3, 1], [4, 1, 0]])  # pad = 0 at [1, 2]
    assert torch.autograd.gradcheck(lambda s: losses.label_smoothed_nll(s, target, 0, 0.1)[0], (student,))
    assert torch.autograd.gradcheck(lambda s: losses.kl_divergence(s, teacher, target, 0, 1.5), (student,))
    assert torch.autograd.gradcheck(
        lambda s: losses.word_kd_loss(s, losses.DenseTeacher.from_logits(teacher), target, 0, 0.1, 0.5, 2.0)[0], (student,)
    )


def test_kl_gradient_matches_closed_form():
    # d KL(p_t || p_s) / d logits_s = p_s - p_t at tau = 1
    student, teacher, target = sv.spec_batch()
    student.requires_grad_(True)
    losses.kl_divergence(student, teacher, target, sv.PAD).backward()
    expected = (torch.softmax(student, -1) - torch.softmax(teacher, -1)).detach()
    expected = expected * target.ne(sv.PAD).unsqueeze(-1)
    assert torch.allclose(student.grad, expected, atol=1e-12)
