"""The generalized Jensen-Shannon divergence (GKD, Agarwal et al., ICLR 2024) against the spec's
float64 vectors (section 9 of ``../shared/specs/methods.md``), a float64 reference, its limits and edges.

``JSD_B(T || S) = B * KL(T || M) + (1 - B) * KL(S || M)``, ``M = B * T + (1 - B) * S``, unscaled:
``JSD_B / B -> KL(T || S)`` as ``B -> 0`` and ``JSD_B / (1 - B) -> KL(S || T)`` as ``B -> 1``.
"""

import math

import numpy as np
import pytest
import torch

from fairseq_kd import losses
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from fairseq_kd.losses import chunked
from tests import spec_vectors as sv
from tests import toy

# section 9's vectors: T = softmax([2.0, 1.0, 0.1, -1.0]), S = softmax([0.5, 1.5, -0.5, 0.0])
SPEC = {
    "kl": 0.46192053675715966,
    "rkl": 0.45550349920059213,
    0.1: 0.040770025281804775,
    0.5: 0.1093739079440223,
    0.9: 0.040311710353330366,
    "small": 0.4618640574594127,  # JSD_1e-4 / 1e-4
    "large": 0.4554489566075472,  # JSD_(1-1e-4) / 1e-4
}


def spec_pair():
    teacher = torch.log_softmax(torch.tensor([2.0, 1.0, 0.1, -1.0], dtype=torch.float64), -1).view(1, 1, 4)
    student = torch.log_softmax(torch.tensor([0.5, 1.5, -0.5, 0.0], dtype=torch.float64), -1).view(1, 1, 4)
    return student, teacher, torch.ones(1, 1, dtype=torch.bool)


def jsd(student, teacher, mask, beta):
    return losses.jsd_from_log_probs(student, teacher, mask, beta)


def reference(student_lprobs, teacher_lprobs, mask, beta):
    """Float64 numpy, in probabilities (no log-space trick): the definition as written."""
    s = np.exp(student_lprobs.detach().double().numpy())
    t = np.exp(teacher_lprobs.detach().double().numpy())
    m = beta * t + (1 - beta) * s

    def kl(p, q):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)

    return torch.from_numpy(np.where(mask.numpy(), beta * kl(t, m) + (1 - beta) * kl(s, m), 0.0))


def test_spec_vectors_float64():
    s, t, mask = spec_pair()
    assert losses.kl_from_log_probs(s, t, mask).item() == pytest.approx(SPEC["kl"], rel=1e-13)
    assert losses.reverse_kl_from_log_probs(s, t, mask).item() == pytest.approx(SPEC["rkl"], rel=1e-13)
    for beta in (0.1, 0.5, 0.9):
        assert jsd(s, t, mask, beta).item() == pytest.approx(SPEC[beta], rel=1e-12), beta
        # the dispatcher and the loss's own flag give the same number
        assert losses.divergence_from_log_probs(s, t, mask, "jsd", jsd_beta=beta).item() == jsd(s, t, mask, beta).item()
    assert (jsd(s, t, mask, 1e-4) / 1e-4).item() == pytest.approx(SPEC["small"], rel=1e-9)
    assert (jsd(s, t, mask, 1 - 1e-4) / 1e-4).item() == pytest.approx(SPEC["large"], rel=1e-9)


def test_limits_are_forward_and_reverse_kl_with_the_spec_scaling():
    s, t, mask = spec_pair()
    gaps_forward, gaps_reverse = [], []
    for b in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        gaps_forward.append(abs((jsd(s, t, mask, b) / b).item() - SPEC["kl"]))
        gaps_reverse.append(abs((jsd(s, t, mask, 1 - b) / b).item() - SPEC["rkl"]))
    # the gap closes linearly in B (the second term of each end is O(B^2))
    for gaps in (gaps_forward, gaps_reverse):
        assert all(later < earlier / 5 for earlier, later in zip(gaps, gaps[1:])), gaps
        assert gaps[-1] < 1e-5
    # unscaled: near the ends the value itself is small, not the KL (GKD reports JSD_B, not JSD_B / B)
    assert jsd(s, t, mask, 1e-3).item() == pytest.approx(1e-3 * SPEC["kl"], rel=1e-2)


def test_end_points_are_refused():
    s, t, mask = spec_pair()
    for beta in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"jsd beta must be in \(0, 1\).*kl.*rkl"):
            jsd(s, t, mask, beta)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_zero_on_identical_inputs_and_positive_otherwise(beta):
    student, teacher, target = sv.spec_batch()
    s, t, mask = losses.log_probs(student), losses.log_probs(teacher), target.ne(sv.PAD)
    assert jsd(s, s.clone(), mask, beta).abs().max().item() < 1e-15
    values = jsd(s, t, mask, beta)
    assert (values[mask] > 0).all() and values[~mask].eq(0).all()
    # a JSD_B is bounded by the entropy-like constant h(B) = -B log B - (1-B) log(1-B)
    assert (values <= -beta * math.log(beta) - (1 - beta) * math.log1p(-beta) + 1e-12).all()


def test_symmetric_at_one_half_and_mirrored_otherwise():
    student, teacher, target = sv.spec_batch()
    s, t, mask = losses.log_probs(student), losses.log_probs(teacher), target.ne(sv.PAD)
    torch.testing.assert_close(jsd(s, t, mask, 0.5), jsd(t, s, mask, 0.5), rtol=1e-14, atol=0)
    # swapping the arguments swaps B and 1 - B
    torch.testing.assert_close(jsd(s, t, mask, 0.2), jsd(t, s, mask, 0.8), rtol=1e-13, atol=0)
    assert not torch.allclose(jsd(s, t, mask, 0.2), jsd(t, s, mask, 0.2))


@pytest.mark.parametrize("rows", [1, 3, 1000])
@pytest.mark.parametrize("beta", [0.05, 0.5, 0.95])
def test_float32_values_against_the_float64_reference(rows, beta, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", rows * 10)  # chunks of 1, 3 or every position
    student, teacher, target = sv.spec_batch()
    mask = target.ne(sv.PAD)
    expected = reference(losses.log_probs(student), losses.log_probs(teacher), mask, beta)
    got = jsd(losses.log_probs(student.float()), losses.log_probs(teacher.float()), mask, beta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    got64 = jsd(losses.log_probs(student), losses.log_probs(teacher), mask, beta)
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_gradcheck_float64_both_sides_and_through_word_kd(beta, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2 * 6)  # several chunks: backward recomputes each
    torch.manual_seed(0)
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(
        lambda a, b: jsd(losses.log_probs(a), losses.log_probs(b), mask, beta), (student, teacher))
    target = torch.tensor([[2, 3, 1], [4, 1, 5]])
    assert torch.autograd.gradcheck(lambda x: losses.word_kd_loss(
        x, losses.DenseTeacher.from_logits(teacher.detach()), target, 1, 0.1, 0.5, 1.5, True, "jsd", jsd_beta=beta)[0], (student,))


def test_gradient_reaches_the_student_through_the_mixture():
    # d JSD / d log S = (1 - B) * S * (log S - log M): the term B * KL(T || M) contributes through M
    s, t, mask = spec_pair()
    s = s.clone().requires_grad_(True)
    beta = 0.3
    (grad,) = torch.autograd.grad(jsd(s, t, mask, beta).sum(), s)
    p_s, p_t = s.detach().exp(), t.exp()
    log_m = torch.log(beta * p_t + (1 - beta) * p_s)
    torch.testing.assert_close(grad, (1 - beta) * p_s * (s.detach() - log_m), rtol=1e-12, atol=1e-15)


def test_peaked_and_tiny_tail_distributions():
    v = 50
    # a teacher with exact zeros (-inf), a one-hot teacher, a student peaked to float32's limits
    teacher = torch.full((3, 1, v), -30.0)
    teacher[0, 0, :5] = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0])
    teacher[0, 0, 10:] = -math.inf
    teacher[1, 0, 7] = 0.0
    teacher[1, 0, 8:] = -math.inf  # one-hot up to exp(-30) entries
    teacher[2] = torch.linspace(-5, 5, v)
    student = torch.linspace(-3, 3, v).expand(3, 1, v).clone()
    student[2, 0, 0] = 90.0  # softmax ~ one-hot with a tail of ~exp(-90) (below float32's normals)
    mask = torch.ones(3, 1, dtype=torch.bool)
    for dtype in (torch.float32, torch.float64):
        s = losses.log_probs(student.to(dtype)).requires_grad_(True)
        t = losses.log_probs(teacher.to(dtype))
        for beta in (1e-3, 0.5, 1 - 1e-3):
            value = jsd(s, t, mask, beta)
            (grad,) = torch.autograd.grad(value.sum(), s)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all(), (dtype, beta)
            expected = reference(s, t, mask, beta)
            torch.testing.assert_close(value.double(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                       atol=1e-7 if dtype == torch.float32 else 1e-14)
    # identical peaked inputs: exactly zero, zero gradient
    s = losses.log_probs(student).requires_grad_(True)
    value = jsd(s, s.detach().clone(), mask, 0.5)
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert value.abs().max().item() < 1e-6 and grad.abs().max().item() < 1e-6


def test_fp16_and_bf16_logits_are_computed_in_float32():
    student, teacher, target = sv.spec_batch(dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        half_s, half_t = student.to(dtype), teacher.to(dtype)
        loss, _, kd = losses.word_kd_loss(half_s, losses.DenseTeacher.from_logits(half_t), target, sv.PAD, 0.1, 0.5, divergence="jsd", jsd_beta=0.3)
        ref = losses.word_kd_loss(half_s.float(), losses.DenseTeacher.from_logits(half_t.float()), target, sv.PAD, 0.1, 0.5, divergence="jsd",
                                  jsd_beta=0.3)
        assert kd.dtype == torch.float32
        assert kd.item() == ref[2].item() and loss.item() == ref[0].item()


def test_word_kd_flag_and_refusals():
    task = toy.make_task()
    sample = toy.make_sample(task, seed=5)
    student, teacher = toy.make_model(task), toy.make_teacher(task, seeds=(2,))
    pad = task.target_dictionary.pad()
    with torch.no_grad():
        s, t = losses.log_probs(student(**sample["net_input"])[0]), teacher(sample["net_input"])
    mask = sample["target"].ne(pad)
    expected = reference(s, t, mask, 0.3).sum().item()
    _, _, log = WordKDCriterion(task, WordKDConfig(sentence_avg=False, kd_divergence="jsd", jsd_beta=0.3))(
        student, sample, teacher=teacher)
    assert log["kd_loss"].item() == pytest.approx(expected, rel=1e-5)
    for beta in (0.0, 1.0):
        with pytest.raises(DistillationError, match=r"--jsd-beta must be in \(0, 1\).*kl.*rkl"):
            WordKDCriterion(task, WordKDConfig(sentence_avg=False, kd_divergence="jsd", jsd_beta=beta))


def test_from_the_topk_cache_it_is_the_jsd_of_the_buckets():
    torch.manual_seed(4)
    student_logits, teacher_logits = torch.randn(2, 3, 9, dtype=torch.float64), 2 * torch.randn(2, 3, 9, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    s, t = losses.log_probs(student_logits), losses.log_probs(teacher_logits)
    ids, values, tail = losses.topk_with_tail(t, 3)
    got = losses.TopKTeacher(ids, values, tail).divergence(s, mask, "jsd", jsd_beta=0.4)
    # by hand: each side's mass on the 3 ids and on the rest, then the definition
    def buckets(lp):
        top = lp.gather(-1, ids)
        return torch.cat([top, torch.log1p(-top.exp().sum(-1, keepdim=True))], -1)
    expected = reference(buckets(s), buckets(t), mask, 0.4)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    # the cache's own criterion accepts it (word_kd takes every divergence on the buckets)
    task = toy.make_task()
    assert WordKDCriterion(task, WordKDConfig(sentence_avg=False, kd_divergence="jsd")).teacher_cache_error({"k": 3}) is None
