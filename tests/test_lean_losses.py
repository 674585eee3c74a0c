"""Memory-lean losses: chunked == unchunked (values and gradients), gradcheck of the
custom autograd Functions, exact references for every divergence, no sync in the
agreement statistics, and the incremental greedy teacher translation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_kd import losses
from fairseq_kd.losses import common
from tests import spec_vectors as sv

PAD = 1


def batch(seed=0, b=3, t=5, v=11, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=dtype) * scale
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype) * scale
    target = torch.randint(2, v, (b, t), generator=g)
    target[0, -2:] = PAD
    target[-1, -1] = PAD
    return student, teacher, target


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of one or two positions (the default holds whole test batches in one chunk)."""

    def set_rows(rows, vocab):
        monkeypatch.setattr(common, "CHUNK_ELEMENTS", rows * vocab)

    return set_rows


# -- references: the plain autograd expressions -----------------------------------


def ref_kl(p_log, q_log, mask):
    p = p_log.exp()
    pointwise = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return pointwise.sum(-1).masked_fill(~mask, 0.0)


def ref_reverse_kl(student_lprobs, teacher_lprobs, mask):
    p = student_lprobs.exp()
    pointwise = (p * (student_lprobs - teacher_lprobs)).masked_fill(torch.isinf(teacher_lprobs) | (p == 0), 0.0)
    return pointwise.sum(-1).masked_fill(~mask, 0.0)


def ref_skew(student_lprobs, teacher_lprobs, mask, lam, reverse):
    anchor, other = (student_lprobs, teacher_lprobs) if reverse else (teacher_lprobs, student_lprobs)
    mixture = torch.logaddexp(anchor + math.log(lam), other + math.log1p(-lam))
    return ref_kl(anchor, mixture, mask)


def ref_floored(student_lprobs, teacher_lprobs, mask, eps):
    ps, pt = student_lprobs.exp(), teacher_lprobs.exp()
    return (pt * (torch.log(pt + eps) - torch.log(ps + eps))).sum(-1).masked_fill(~mask, 0.0)


REFERENCES = {
    "kl": lambda s, t, m: ref_kl(t, s, m),
    "rkl": ref_reverse_kl,
    "skl": lambda s, t, m: ref_skew(s, t, m, 0.1, False),
    "srkl": lambda s, t, m: ref_skew(s, t, m, 0.1, True),
}


def lean(name, s, t, m):
    return losses.divergence_from_log_probs(s, t, m, name, 0.1)


@pytest.mark.parametrize("name", losses.DIVERGENCES)
@pytest.mark.parametrize("rows", [1, 2, 100])
def test_divergences_equal_reference_values_and_gradients(name, rows, tiny_chunks):
    student, teacher, target = batch(dtype=torch.float32)
    tiny_chunks(rows, student.size(-1))
    mask = target.ne(PAD)
    grads = []
    for fn in (lean, lambda n, s, t, m: REFERENCES[n](s, t, m)):
        s_logits = student.clone().requires_grad_(True)
        t_logits = teacher.clone().requires_grad_(True)
        value = fn(name, F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), mask)
        weights = torch.arange(value.numel(), dtype=value.dtype).view_as(value) + 1.0
        (value * weights).sum().backward()
        grads.append((value.detach(), s_logits.grad, t_logits.grad))
    (v1, gs1, gt1), (v2, gs2, gt2) = grads
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt1, gt2, rtol=1e-5, atol=1e-6)
    assert v1[~mask].eq(0).all()


def test_chunked_equals_unchunked_bitwise_for_the_kl(tiny_chunks):
    student, teacher, target = batch(dtype=torch.float32, v=13)
    mask = target.ne(PAD)
    results = []
    for rows in (1, 3, 1000):
        tiny_chunks(rows, 13)
        s = F.log_softmax(student.clone().requires_grad_(True), -1)
        s.retain_grad()
        kl = losses.kl_from_log_probs(s, F.log_softmax(teacher, -1), mask)
        kl.sum().backward()
        results.append((kl.detach(), s.grad))
    for kl, grad in results[1:]:
        assert torch.equal(kl, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("kind, eps", [("kl", 0.0), ("kl_finite", 0.0), ("floored", 1e-6), ("floored", 0.3)])
def test_pair_divergence_gradcheck(kind, eps, tiny_chunks):
    student, teacher, target = batch(b=2, t=3, v=5, scale=1.0)
    tiny_chunks(2, 5)
    mask = target.ne(PAD)

    def fn(s_logits, t_logits):
        return common.pair_divergence(F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1), mask, kind, eps)

    assert torch.autograd.gradcheck(fn, (student.requires_grad_(True), teacher.requires_grad_(True)))


def test_pair_divergence_gradcheck_on_rows(tiny_chunks):
    student, teacher, target = batch(b=2, t=3, v=5, scale=1.0)
    tiny_chunks(1, 5)
    mask = target.ne(PAD)
    rows = torch.tensor([0, 4])  # non-pad: 0, 3, 4

    def fn(s_logits, t_logits):
        return common.pair_divergence(F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1), mask, rows=rows)

    assert torch.autograd.gradcheck(fn, (student.requires_grad_(True), teacher.requires_grad_(True)))
    value = fn(student, teacher).reshape(-1)
    full = ref_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1), mask).reshape(-1)
    assert torch.allclose(value[rows], full[rows]) and value[[1, 2, 3, 5]].eq(0).all()


def test_chunked_rows_gradcheck(tiny_chunks):
    student, teacher, target = batch(b=2, t=3, v=5, scale=1.0)
    tiny_chunks(2, 5)
    mask = target.ne(PAD)
    weight = torch.rand(2, 3, dtype=torch.float64)

    def rows_fn(s, t, w):
        return (w.unsqueeze(-1) * s.exp() * t).sum(-1) + torch.logsumexp(s + t, -1)

    def fn(s_logits, t_logits):
        return common.chunked_rows(rows_fn, (F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), weight), mask)

    assert torch.autograd.gradcheck(fn, (student.requires_grad_(True), teacher.requires_grad_(True)))


def test_zero_teacher_probabilities_give_finite_kl():
    student, teacher, target = batch(dtype=torch.float32)
    t = F.log_softmax(teacher, -1)
    t[..., 3] = -math.inf  # the teacher rules token 3 out
    t = t - torch.logsumexp(t, -1, keepdim=True)
    s = F.log_softmax(student, -1).requires_grad_(True)
    mask = target.ne(PAD)
    kl = losses.kl_from_log_probs(s, t, mask)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all()
    torch.testing.assert_close(kl, ref_kl(t, s.detach(), mask))


def test_spec_vectors_still_hold_with_chunks(tiny_chunks):
    student, teacher, target = sv.spec_batch()
    tiny_chunks(1, 10)
    assert losses.kl_divergence(student, teacher, target, sv.PAD).item() == pytest.approx(sv.WORD_KD_KL_TAU_1, rel=1e-6)
    assert losses.tie_kd_kl(student, teacher, target, sv.PAD).item() == pytest.approx(sv.TIE_KD_KL_EPS, rel=1e-6)
