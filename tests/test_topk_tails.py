"""The top-k cache's tail buckets at their edges: the student's and the teacher's tail mass from 1e-2
down to 1e-9, losses and gradients against a float64 reference computed from the full distributions."""

import math

import pytest
import torch

from fairseq_kd import losses

V, K, PAD = 60, 4, 1
TAILS = [1e-2, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]


def logits_with_tail(tail_mass: float, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 ``[1, T, V]`` logits whose softmax puts ``tail_mass`` outside ``ids`` ``[1, T, K]``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(1, ids.size(1), V, generator=g, dtype=torch.float64)
    outside = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, ids, False)
    top = logits.masked_fill(outside, -math.inf).logsumexp(-1, keepdim=True)
    rest = logits.masked_fill(~outside, -math.inf).logsumexp(-1, keepdim=True)
    shift = math.log(tail_mass / (1 - tail_mass)) + top - rest
    return torch.where(outside, logits + shift, logits)


def reference_buckets(lprobs64: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 buckets: the log-probabilities at ``ids`` and the log of the tail's summed probabilities."""
    outside = torch.ones_like(lprobs64, dtype=torch.bool).scatter_(-1, ids, False)
    tail = (lprobs64.exp() * outside).sum(-1, keepdim=True).log()
    return torch.cat([lprobs64.gather(-1, ids), tail], dim=-1)


def ids_of(seed: int, positions: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(V - 2, generator=g)[:K] + 2 for _ in range(positions)]).unsqueeze(0)


def reference_word_kd(student64, ids, teacher_buckets64, target, epsilon, alpha):
    """float64 ``(1 - alpha) * LS + alpha * KL(buckets_t || buckets_s)`` and its gradient w.r.t. the logits."""
    x = student64.clone().requires_grad_(True)
    lprobs = torch.log_softmax(x, -1)
    ls, _ = losses.nll_from_log_probs(lprobs, target, PAD, epsilon)
    s = reference_buckets(lprobs, ids)
    kl = (teacher_buckets64.exp() * (teacher_buckets64 - s)).sum()
    loss = (1 - alpha) * ls + alpha * kl
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("student_tail", TAILS)
@pytest.mark.parametrize("epsilon, alpha", [(0.0, 1.0), (0.0, 0.5), (0.1, 0.5)])
def test_student_tail_gradient_matches_float64(student_tail, epsilon, alpha):
    ids = ids_of(0)
    student64 = logits_with_tail(student_tail, ids, seed=1)
    teacher64 = torch.log_softmax(logits_with_tail(3e-3, ids, seed=2), -1)
    teacher_buckets64 = reference_buckets(teacher64, ids)
    target = ids[..., 0].clone()
    ref_loss, ref_grad = reference_word_kd(student64, ids, teacher_buckets64, target, epsilon, alpha)

    x = student64.float().requires_grad_(True)
    top, values, tail = losses.topk_with_tail(teacher64.float(), K)  # the cache's float32 build
    assert torch.equal(top.sort(-1).values, ids.sort(-1).values)  # the same K tokens, by decreasing value
    loss, _, _ = losses.word_kd_loss(x, losses.TopKTeacher(top, values, tail), target, PAD, epsilon, alpha)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    outside = torch.ones_like(grad, dtype=torch.bool).scatter_(-1, ids, False)
    # the tail tokens' gradient summed per position (about -alpha * teacher tail): sign and size
    tail_grad, ref_tail_grad = (grad.double() * outside).sum(-1), (ref_grad * outside).sum(-1)
    assert torch.allclose(tail_grad, ref_tail_grad, rtol=1e-4, atol=1e-8), (tail_grad, ref_tail_grad)
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_student_buckets_gradcheck_and_empty_tail():
    torch.manual_seed(0)
    ids = ids_of(3, positions=2)
    x = torch.randn(1, 2, V, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, K + 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y: (losses.student_buckets(torch.log_softmax(y, -1), ids) * w).sum(), (x,))
    # ids covering the vocabulary: the tail is empty (-inf) and receives no gradient
    all_ids = torch.arange(V).view(1, 1, V)
    y = torch.randn(1, 1, V, requires_grad=True)
    buckets = losses.student_buckets(torch.log_softmax(y, -1), all_ids)
    assert (buckets[..., -1] == -80.0).all()  # floored: finite, and no gradient
    buckets[..., :-1].sum().backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("teacher_tail", TAILS)
def test_teacher_tail_stored_at_build_matches_float64(teacher_tail):
    """The cache's teacher tail is the float32 log-sum-exp at build time, not ``1 - sum`` of its float16
    top-k values (which is off by most of its size below about 1e-4)."""
    ids = ids_of(4, positions=5)
    teacher64 = torch.log_softmax(logits_with_tail(teacher_tail, ids, seed=5), -1)
    top, values, tail = losses.topk_with_tail(teacher64.float(), K)
    ref = reference_buckets(teacher64, top)
    assert tail.dtype == torch.float32
    assert torch.allclose(tail.double().exp(), ref[..., -1].exp(), rtol=1e-4, atol=0), (tail.exp(), teacher_tail)
    # the bucketed teacher the loss sees, from the stored float16 values and float32 tail
    buckets = losses.teacher_buckets(values.half(), tail)
    assert torch.allclose(buckets[..., -1].double().exp(), ref[..., -1].exp(), rtol=1e-4, atol=0)
    # and the KL to a student against the float64 one
    student64 = torch.log_softmax(logits_with_tail(1e-3, ids, seed=6), -1)
    mask = torch.ones(1, ids.size(1), dtype=torch.bool)
    kl = losses.TopKTeacher(top, values.half(), tail).divergence(student64.float(), mask, "kl").sum()
    s = reference_buckets(student64, top)
    ref_kl = (ref.exp() * (ref - s)).sum()
    assert kl.item() == pytest.approx(ref_kl.item(), rel=2e-3, abs=1e-6)


def test_a_released_teacher_tensor_is_refused_when_read_again():
    """The in-place KL leaves the student's gradient factor in the teacher's storage: a second read fails
    instead of returning a wrong value."""
    from fairseq_kd.losses.chunked import ReleasedTensorError, pair_divergence

    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(2, 3, 11), -1)
    logits = torch.randn(2, 3, 11, requires_grad=True)
    student = torch.log_softmax(logits, -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    expected = pair_divergence(teacher.clone(), student, mask, "kl").sum()
    first = pair_divergence(teacher, student, mask, "kl", overwrite_p=True).sum()
    assert first.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ReleasedTensorError, match="released"):
        pair_divergence(teacher, student, mask, "kl")
    with pytest.raises(ReleasedTensorError):
        losses.student_buckets(teacher[0], torch.zeros(3, 2, dtype=torch.long))  # a view of it as well
    (reference,) = torch.autograd.grad(expected, logits, retain_graph=True)
    first.backward()  # the gradient itself is still right
    assert torch.allclose(logits.grad, reference, atol=1e-6)


def test_dense_and_full_topk_teachers_answer_alike():
    """One interface: at k = V the cached form gives the live form's argmax, top-k, probabilities at ids,
    gold index (as a bucket) and divergences (the tail bucket empty)."""
    g = torch.Generator().manual_seed(5)
    vocab = 9
    teacher = torch.log_softmax(torch.randn(2, 3, vocab, generator=g, dtype=torch.float64), -1)
    student = torch.log_softmax(torch.randn(2, 3, vocab, generator=g, dtype=torch.float64), -1)
    target = torch.randint(0, vocab, (2, 3), generator=g)
    ids, values, tail = losses.topk_with_tail(teacher, vocab)
    dense, cached = losses.DenseTeacher(teacher), losses.TopKTeacher(ids, values, tail)
    assert torch.equal(dense.argmax(), cached.argmax())
    for k in (1, 4):
        (d_ids, d_lp), (c_ids, c_lp) = dense.top(k), cached.top(k)
        assert torch.equal(d_ids, c_ids) and torch.allclose(d_lp, c_lp)
    probe = torch.randint(0, vocab, (2, 3, 4), generator=g)
    assert torch.allclose(dense.probs_at(probe), cached.probs_at(probe))
    assert torch.equal(ids.gather(-1, cached.gold(target).unsqueeze(-1)).squeeze(-1), dense.gold(target))
    mask = torch.ones(2, 3, dtype=torch.bool)
    for divergence in losses.DIVERGENCES:
        a = dense.divergence(student, mask, divergence)
        b = cached.divergence(student, mask, divergence)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), divergence
    with pytest.raises(ValueError, match="the cached k"):
        losses.TopKTeacher(ids[..., :3], values[..., :3], tail).top(4)


def test_a_released_dense_teacher_is_refused_when_read_again():
    from fairseq_kd.losses.chunked import ReleasedTensorError

    g = torch.Generator().manual_seed(6)
    student = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    teacher = losses.DenseTeacher(torch.log_softmax(torch.randn(2, 3, 7, generator=g), -1))
    target = torch.randint(2, 7, (2, 3), generator=g)
    loss, _, _ = losses.word_kd_loss(student, teacher, target, 0, 0.1, 0.5, release_teacher=True)
    loss.backward()
    for read in (teacher.argmax, lambda: teacher.top(2), lambda: teacher.divergence(student.detach(), target.ne(0))):
        with pytest.raises(ReleasedTensorError):
            read()


def test_the_cached_teacher_is_read_on_the_batchs_gold_prefixes_only():
    from fairseq_kd.cache.dataset import IDS_KEY, LPROBS_KEY, TAIL_KEY
    from fairseq_kd.errors import DistillationError
    from fairseq_kd.teacher.cached import CachedTeacher

    prev = torch.tensor([[2, 5, 6]])
    sample = {"net_input": {"prev_output_tokens": prev}, IDS_KEY: torch.zeros(1, 3, 2, dtype=torch.long),
              LPROBS_KEY: torch.full((1, 3, 2), -1.0).half(), TAIL_KEY: torch.full((1, 3), -1.0)}
    teacher = CachedTeacher.from_batch(sample)
    assert teacher.distribution(sample["net_input"]).ids is sample[IDS_KEY]
    with pytest.raises(DistillationError, match="gold prefixes only"):
        teacher.distribution({"prev_output_tokens": prev.clone()})
    with pytest.raises(DistillationError, match="no cached teacher distribution"):
        CachedTeacher.from_batch({"net_input": {"prev_output_tokens": prev}})
