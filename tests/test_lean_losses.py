"""Memory-lean losses: chunked == unchunked (values and gradients), gradcheck of the
custom autograd Functions, exact references for every divergence, no sync in the
agreement statistics, and the incremental greedy teacher translation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_kd import losses
from fairseq_kd.losses import chunked
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
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", rows * vocab)

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


def ref_jsd(student_lprobs, teacher_lprobs, mask, beta):
    mixture = torch.logaddexp(teacher_lprobs + math.log(beta), student_lprobs + math.log1p(-beta))
    return beta * ref_kl(teacher_lprobs, mixture, mask) + (1 - beta) * ref_kl(student_lprobs, mixture, mask)


def ref_floored(student_lprobs, teacher_lprobs, mask, eps):
    ps, pt = student_lprobs.exp(), teacher_lprobs.exp()
    return (pt * (torch.log(pt + eps) - torch.log(ps + eps))).sum(-1).masked_fill(~mask, 0.0)


REFERENCES = {
    "kl": lambda s, t, m: ref_kl(t, s, m),
    "rkl": ref_reverse_kl,
    "skl": lambda s, t, m: ref_skew(s, t, m, 0.1, False),
    "srkl": lambda s, t, m: ref_skew(s, t, m, 0.1, True),
    "jsd": lambda s, t, m: ref_jsd(s, t, m, 0.5),
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
        return chunked.pair_divergence(F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1), mask, kind, eps)

    assert torch.autograd.gradcheck(fn, (student.requires_grad_(True), teacher.requires_grad_(True)))


def test_pair_divergence_gradcheck_on_rows(tiny_chunks):
    student, teacher, target = batch(b=2, t=3, v=5, scale=1.0)
    tiny_chunks(1, 5)
    mask = target.ne(PAD)
    rows = torch.tensor([0, 4])  # non-pad: 0, 3, 4

    def fn(s_logits, t_logits):
        return chunked.pair_divergence(F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1), mask, rows=rows)

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
        return chunked.chunked_rows(rows_fn, (F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), weight), mask)

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


# -- agreement statistics: tensors, no device sync -----------------------------------


def test_agreement_counts_are_tensors_and_sum():
    from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
    from tests import toy

    task = toy.make_task()
    model, teacher = toy.make_model(task, seed=0), toy.make_teacher(task, seeds=(1,))
    criterion = WordKDCriterion(task, WordKDConfig(sentence_avg=False))
    logs = []
    for seed in (0, 1):
        sample = toy.make_sample(task, batch_size=4, seed=seed)
        _, _, log = criterion(model, sample, teacher=teacher)
        assert torch.is_tensor(log["kd_agree"]) and torch.is_tensor(log["kd_tokens"])
        student = model(**sample["net_input"])[0]
        t = teacher(sample["net_input"])
        assert log["kd_agree"].item() == losses.top1_agreement(student, t, sample["target"], task.target_dictionary.pad()).item()
        assert log["kd_tokens"].item() == sample["ntokens"]
        logs.append(log)
    assert criterion.logging_outputs_can_be_summed()
    total = sum(log["kd_agree"] for log in logs)
    assert total.item() == logs[0]["kd_agree"].item() + logs[1]["kd_agree"].item()


# -- incremental greedy teacher translation --------------------------------------------


@torch.no_grad()
def quadratic_greedy_reference(teacher, net_input, pad, eos, max_len_a, max_len_b, max_positions):
    """The former algorithm: the whole prefix re-decoded at every step."""
    from fairseq_kd.teacher.greedy import shift_right

    src_tokens = net_input["src_tokens"]
    encoder_outs = teacher.forward_encoder(net_input)
    src_len = (src_tokens.ne(pad) & src_tokens.ne(eos)).sum(dim=1)
    budget = torch.floor(max_len_a * src_len.double() + max_len_b).long().clamp(0, max(max_positions - 1, 0))
    bsz, steps = src_tokens.size(0), int(budget.max()) + 1
    tokens = src_tokens.new_full((bsz, steps + 1), pad)
    tokens[:, 0] = eos
    finished = torch.zeros(bsz, dtype=torch.bool)
    for step in range(steps):
        lprobs = teacher.forward_decoder(tokens[:, : step + 1], encoder_outs)
        scores = lprobs[:, -1, :].clone()
        scores[:, pad] = -math.inf
        if step == 0:
            scores[:, eos] = -math.inf
        chosen = torch.where(budget.le(step), torch.full_like(budget, eos), scores.argmax(dim=-1))
        tokens[:, step + 1] = chosen.masked_fill(finished, pad)
        finished |= tokens[:, step + 1].eq(eos)
        if bool(finished.all()):
            break
    target = tokens[:, 1 : step + 2].contiguous()
    return target, shift_right(target, pad, eos), lprobs


def real_batches(prepared, n_batches=3):
    from fairseq_kd.tasks.distillation_translation import DistillationTranslationConfig, DistillationTranslationTask

    cfg = DistillationTranslationConfig(
        data=prepared.bin, source_lang=prepared.src, target_lang=prepared.tgt, dataset_impl="mmap",
        required_seq_len_multiple=1,
    )
    task = DistillationTranslationTask.setup_task(cfg)
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=20, seed=1).next_epoch_itr(shuffle=False)
    return task, [batch for _, batch in zip(range(n_batches), itr)]


@pytest.mark.parametrize("max_len", [(1.2, 10), (0.0, 3)])
def test_incremental_greedy_equals_quadratic_reference_on_a_trained_teacher(prepared, teacher_ckpt, max_len):
    from fairseq_kd.teacher import greedy_teacher_translation, load_teacher

    task, batches = real_batches(prepared)
    teacher = load_teacher([teacher_ckpt], task)
    d = task.target_dictionary
    a, b = max_len
    for sample in batches:
        hyp = greedy_teacher_translation(teacher, sample["net_input"], d.pad(), d.eos(), a, b, 1024)
        target, prev, last_lprobs = quadratic_greedy_reference(
            teacher, sample["net_input"], d.pad(), d.eos(), a, b, 1024
        )
        assert torch.equal(hyp["target"], target)
        assert torch.equal(hyp["prev_output_tokens"], prev)
        assert hyp["ntokens"] == int(target.ne(d.pad()).sum())
        valid = target.ne(d.pad())
        torch.testing.assert_close(hyp["teacher_lprobs"][valid], last_lprobs[valid], rtol=1e-5, atol=1e-5)
    # some rows end on their own: the trained teacher does emit EOS
    assert (hyp["target"].ne(d.pad()).sum(1) < hyp["target"].size(1)).any() or a == 0.0


def test_incremental_greedy_equals_reference_for_an_ensemble():
    from fairseq_kd.teacher import greedy_teacher_translation
    from tests import toy

    task = toy.make_task()
    d = task.target_dictionary
    teacher = toy.make_teacher(task, seeds=(1, 2))
    sample = toy.make_sample(task, batch_size=5, seed=2)
    hyp = greedy_teacher_translation(teacher, sample["net_input"], d.pad(), d.eos(), 1.0, 4, 64)
    target, prev, _ = quadratic_greedy_reference(teacher, sample["net_input"], d.pad(), d.eos(), 1.0, 4, 64)
    assert torch.equal(hyp["target"], target) and torch.equal(hyp["prev_output_tokens"], prev)
    torch.testing.assert_close(hyp["teacher_lprobs"], teacher(sample["net_input"], prev))


# -- gradients built in the teacher's storage ---------------------------------------------


@pytest.mark.parametrize("kind, eps", [("kl", 0.0), ("floored", 1e-6)])
@pytest.mark.parametrize("use_rows", [False, True])
def test_gradient_in_the_teachers_storage_equals_the_allocated_one(kind, eps, use_rows, tiny_chunks):
    student, teacher, target = batch(dtype=torch.float32)
    tiny_chunks(2, student.size(-1))
    mask = target.ne(PAD)
    rows = mask.reshape(-1).nonzero().squeeze(1)[::2] if use_rows else None
    grads = []
    for overwrite in (False, True):
        s = student.clone().requires_grad_(True)
        t = F.log_softmax(teacher, -1)
        value = chunked.pair_divergence(t, F.log_softmax(s, -1), mask, kind, eps, rows=rows, overwrite_p=overwrite)
        weights = torch.arange(value.numel(), dtype=value.dtype).view_as(value) + 1.0
        (value * weights).sum().backward(retain_graph=True)
        grads.append((value.detach(), s.grad.clone()))
        if overwrite:
            assert not torch.equal(t, F.log_softmax(teacher, -1))  # the storage was reused
            with pytest.raises(RuntimeError, match="inplace"):
                (value * weights).sum().backward()  # a second backward is refused, not wrong
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)


# -- TIE-KD, Self-Evolution KD, Selective KD pieces ------------------------------------------


@pytest.mark.parametrize("v, k", [(13, 4), (1024, 5)])  # 1024: top-k through block maxima (block_max.py)
def test_ranking_from_log_probs_equals_ranking_from_probs(v, k):
    student, teacher, _ = batch(v=v)
    s = F.log_softmax(student, -1).requires_grad_(True)
    t = F.log_softmax(teacher, -1)
    lean_rank = losses.ranking.hierarchical_ranking_from_teacher(s, losses.DenseTeacher(t), k)
    lean_rank.sum().backward()
    s2 = s.detach().clone().requires_grad_(True)
    ref = losses.hierarchical_ranking_from_probs(s2.exp(), t.exp(), k)
    ref.sum().backward()
    torch.testing.assert_close(lean_rank, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-12, atol=1e-12)


def test_tie_kd_terms_match_the_full_size_formulas(tiny_chunks):
    student, teacher, target = batch(v=13)
    tiny_chunks(1, 13)
    mask = target.ne(PAD)
    for eps in (0.0, 1e-6):
        s = student.clone().requires_grad_(True)
        kl, rank = losses.tie_kd_terms(s, losses.DenseTeacher.from_logits(teacher), target, PAD, topk=3, log_epsilon=eps)
        (kl + rank).backward()
        s2 = student.clone().requires_grad_(True)
        ls, lt = F.log_softmax(s2, -1), F.log_softmax(teacher, -1)
        ref_kl_sum = (ref_floored(ls, lt, mask, eps) if eps else ref_kl(lt, ls, mask)).sum()
        ref_rank = losses.hierarchical_ranking_from_probs(ls.exp(), lt.exp(), 3).masked_fill(~mask, 0).sum()
        (ref_kl_sum + ref_rank).backward()
        assert kl.item() == pytest.approx(ref_kl_sum.item(), rel=1e-12)
        assert rank.item() == pytest.approx(ref_rank.item(), rel=1e-12)
        torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gt_weight", [0.0, 0.3, 0.5, 1.0])
def test_sekd_difficulty_equals_the_kl_to_the_prior(gt_weight):
    student, teacher, target = batch(v=9)
    ls, lt = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    mask = target.ne(PAD)
    prior = losses.gold_teacher_log_mixture(lt, target, gt_weight)
    expected = ref_kl(prior, ls, mask).clamp_min(0.0)
    kl = losses.kl_from_log_probs(ls, lt, mask)
    got = losses.self_evolution.sekd_difficulty(kl, ls, lt, target, mask, gt_weight)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prior_side, divergence", [("student", "fkl"), ("student", "rkl"), ("target", "fkl"), ("target", "rkl")])
def test_sekd_mixed_rows_only_equals_every_row(prior_side, divergence, tiny_chunks):
    """The proxy built on the hard positions only equals stage 2 over every position."""
    student, teacher, target = batch(v=9)
    tiny_chunks(1, 9)
    opts = dict(gt_weight=0.5, hard_criterion="ratio", hard_ratio=0.5, lam=0.4, divergence=divergence,
                prior_side=prior_side)
    s = student.clone().requires_grad_(True)
    terms = losses.self_evolution_kd(s, losses.DenseTeacher.from_logits(teacher), target, PAD, **opts)
    terms.kd_loss.backward()
    s2 = student.clone().requires_grad_(True)
    ls, lt = F.log_softmax(s2, -1), F.log_softmax(teacher, -1)
    mask = target.ne(PAD)
    prior = losses.gold_teacher_log_mixture(lt, target, 0.5)
    d = ref_kl(prior, ls.detach(), mask).clamp_min(0.0)
    hard = losses.sekd_hard_mask(d, mask, "ratio", hard_ratio=0.5)
    ratio = losses.sekd_ratios(d, hard, 0.4)
    assert 0 < hard.sum() < mask.sum()
    full = losses.sekd_divergence(ls, lt, target, ratio, mask, 0.5, divergence, prior_side).sum()
    full.backward()
    assert terms.kd_loss.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.equal(terms.n_hard, hard.sum())
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_selected_rows_kl_equals_masked_kl(tiny_chunks):
    student, teacher, target = batch(dtype=torch.float32)
    tiny_chunks(2, student.size(-1))
    mask = target.ne(PAD)
    selected = mask & (torch.arange(mask.numel()).view_as(mask) % 3 == 0)
    rows = selected.reshape(-1).nonzero().squeeze(1)
    s1 = F.log_softmax(student.clone().requires_grad_(True), -1)
    s1.retain_grad()
    lean_kl = chunked.pair_divergence(F.log_softmax(teacher, -1), s1, selected, rows=rows, overwrite_p=True)
    lean_kl.sum().backward()
    s2 = F.log_softmax(student.clone().requires_grad_(True), -1)
    s2.retain_grad()
    ref = ref_kl(F.log_softmax(teacher, -1), s2, selected)
    ref.sum().backward()
    torch.testing.assert_close(lean_kl, ref)
    torch.testing.assert_close(s1.grad, s2.grad)


# -- whole criterions: chunked == unchunked ------------------------------------------------


def _criterion_run(criterion, model, sample, teacher):
    model.zero_grad()
    loss, _, log = criterion(model, sample, teacher=teacher)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, log


@pytest.mark.parametrize("name", ["word_kd", "word_kd_skl", "tie_kd", "self_evolution_kd", "selective_kd"])
def test_criterions_chunked_equal_unchunked(name, monkeypatch):
    from fairseq_kd.criterions.selective_kd import SelectiveKDConfig, SelectiveKDCriterion
    from fairseq_kd.criterions.self_evolution_kd import SelfEvolutionKDConfig, SelfEvolutionKDCriterion
    from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion
    from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
    from tests import toy

    task = toy.make_task()
    model, teacher = toy.make_model(task, seed=0), toy.make_teacher(task, seeds=(1,))
    sample = toy.make_sample(task, batch_size=4, seed=3)
    make = {
        "word_kd": lambda: WordKDCriterion(task, WordKDConfig(sentence_avg=False)),
        "word_kd_skl": lambda: WordKDCriterion(task, WordKDConfig(sentence_avg=False, kd_divergence="skl")),
        "tie_kd": lambda: TieKDCriterion(task, TieKDConfig(sentence_avg=False)),
        "self_evolution_kd": lambda: SelfEvolutionKDCriterion(task, SelfEvolutionKDConfig(sentence_avg=False)),
        "selective_kd": lambda: SelectiveKDCriterion(task, SelectiveKDConfig(sentence_avg=False)),
    }[name]
    vocab = len(task.target_dictionary)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 10**9)
    whole = _criterion_run(make(), model, sample, teacher)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * vocab)
    in_chunks = _criterion_run(make(), model, sample, teacher)
    torch.testing.assert_close(in_chunks[0], whole[0], rtol=1e-6, atol=1e-6)
    assert in_chunks[1].keys() == whole[1].keys() and whole[1]
    for key in whole[1]:
        torch.testing.assert_close(in_chunks[1][key], whole[1][key], rtol=1e-5, atol=1e-7)
    assert torch.equal(in_chunks[2]["kd_agree"], whole[2]["kd_agree"])


@pytest.mark.parametrize("lam_mode", [("const", 0.4), ("linear", 0.5)])
def test_sekd_gradient_in_the_teachers_storage_equals_the_allocated_one(lam_mode, tiny_chunks):
    student, teacher, target = batch(v=9)
    tiny_chunks(2, 9)
    opts = dict(gt_weight=0.5, hard_criterion="ratio", hard_ratio=0.5, lambda_mode=lam_mode[0], lam=lam_mode[1])
    results = []
    for release in (False, True):
        s = student.clone().requires_grad_(True)
        t = F.log_softmax(teacher, -1)
        loss, _, terms = losses.self_evolution_kd_loss(
            s, losses.DenseTeacher(t), target, PAD, 0.1, 0.5, release_teacher=release, **opts
        )
        loss.backward()
        results.append((loss.detach(), terms, s.grad))
    assert results[1][1].n_hard > 0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-10, atol=1e-12)


# -- per-pass backward: the task hands the criterion optimizer.backward -------------------------------------


class ScalingOptimizer:
    """The part of fairseq's optimizer that ``train_step`` uses, with a loss scale as under --fp16."""

    def __init__(self, scale=1.0):
        self.scale, self.calls = scale, 0

    def backward(self, loss):
        self.calls += 1
        (loss * self.scale).backward()


def _train_step(task, model, criterion, sample, per_pass, ignore_grad=False, scale=1.0):
    """One ``train_step``: per pass (the criterion's default), or as one graph (``backward_per_pass`` off)."""
    model.zero_grad()
    criterion.zero_grad()
    if not per_pass:
        criterion.backward_per_pass = False  # the task then runs one backward of the whole loss
    optimizer = ScalingOptimizer(scale)
    try:
        loss, sample_size, log = task.train_step(sample, model, criterion, optimizer, 0, ignore_grad=ignore_grad)
    finally:
        criterion.__dict__.pop("backward_per_pass", None)
    params = list(model.named_parameters()) + [("criterion." + n, p) for n, p in criterion.named_parameters()]
    grads = {n: p.grad.clone() for n, p in params if p.grad is not None}
    return loss, sample_size, log, grads, optimizer.calls


def _assert_same_step(per_pass, whole, passes):
    loss, size, log, grads, calls = per_pass
    assert calls == passes and whole[4] == 1
    assert not loss.requires_grad
    assert torch.equal(loss, whole[0].detach()) and size == whole[1]  # the same formula on the same values
    assert log.keys() == whole[2].keys()
    for key, value in whole[2].items():
        assert torch.equal(torch.as_tensor(log[key]), torch.as_tensor(value)), key
    assert grads.keys() == whole[3].keys() and any(k.startswith("encoder.") for k in grads)
    top = max(g.abs().max() for g in whole[3].values())
    for key, grad in whole[3].items():  # float32 rounding: the parts are summed in another order
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-6 * float(top), msg=key)


def _toy(seed=3):
    from tests import toy

    task = toy.make_task()
    model = toy.make_model(task, seed=0)
    task.teacher = toy.make_teacher(task, seeds=(1,))
    return task, model, toy.make_sample(task, batch_size=4, seed=seed)


@pytest.mark.parametrize("ignore_grad", [False, True])
def test_tie_kd_per_pass_backward_equals_one_graph(ignore_grad):
    from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion

    task, model, sample = _toy()
    criterion = TieKDCriterion(task, TieKDConfig(sentence_avg=False, tie_iterations=3, kd_alpha=0.6))
    per_pass = _train_step(task, model, criterion, sample, True, ignore_grad)
    whole = _train_step(task, model, criterion, sample, False, ignore_grad)
    _assert_same_step(per_pass, whole, passes=3)
    assert all(bool(g.eq(0).all()) for g in per_pass[3].values()) == ignore_grad


HYBRID_SETTINGS = {
    "fixed": dict(gate="fixed", gate_fixed_value=0.3, kd_alpha=0.7),
    "scalar": dict(gate="scalar"),
    "sentence": dict(gate="sentence", gate_input_dim=16, kd_alpha=0.6),
    "token": dict(gate="token", gate_input_dim=16, hybrid_token_prefix="teacher", kd_alpha=0.8),
    "scalar_tempered": dict(gate="scalar", kd_temperature=2.0, kd_alpha=0.5),
}


@pytest.mark.parametrize("ignore_grad", [False, True])
@pytest.mark.parametrize("setting", sorted(HYBRID_SETTINGS))
def test_hybrid_gated_kd_per_pass_backward_equals_one_graph(setting, ignore_grad):
    from fairseq_kd.criterions.hybrid_gated_kd import HybridGatedKDConfig, HybridGatedKDCriterion

    task, model, sample = _toy()
    cfg = HybridGatedKDConfig(sentence_avg=False, hybrid_sent_target="greedy-online", **HYBRID_SETTINGS[setting])
    criterion = HybridGatedKDCriterion(task, cfg)
    with torch.no_grad():  # a gate away from its initial state, input weights not zero
        for p in criterion.parameters():
            p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    per_pass = _train_step(task, model, criterion, sample, True, ignore_grad)
    whole = _train_step(task, model, criterion, sample, False, ignore_grad)
    # the pass on y_hat, the pass on the gold target (with gradients when it has a term), the gate objective
    gold_trains = cfg.kd_alpha < 1 or cfg.hybrid_token_prefix == "gold"
    _assert_same_step(per_pass, whole, passes=1 + gold_trains + (criterion.gate is not None))
    if criterion.gate is not None:
        assert any(k.startswith("criterion.") for k in per_pass[3])
    for key in ("tok_tokens", "sent_tokens", "gate_sum", "gate_sq_sum", "kd_agree", "kd_tokens"):
        assert torch.is_tensor(per_pass[2][key]), key  # no .item(): no device sync per step


@pytest.mark.parametrize("name", ["tie_kd", "hybrid_gated_kd"])
def test_per_pass_backward_carries_the_loss_scale_into_the_encoder(name):
    """fp16's loss scale applies to every pass; the encoder's gradient arrives scaled once, not twice."""
    from fairseq_kd.criterions.hybrid_gated_kd import HybridGatedKDConfig, HybridGatedKDCriterion
    from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion

    task, model, sample = _toy(seed=5)
    criterion = (TieKDCriterion(task, TieKDConfig(sentence_avg=False)) if name == "tie_kd" else
                 HybridGatedKDCriterion(task, HybridGatedKDConfig(sentence_avg=False, kd_alpha=0.5)))
    scaled = _train_step(task, model, criterion, sample, True, scale=64.0)[3]
    whole = _train_step(task, model, criterion, sample, False)[3]
    top = max(g.abs().max() for g in whole.values())
    for key, grad in whole.items():
        torch.testing.assert_close(scaled[key] / 64.0, grad, rtol=1e-5, atol=1e-6 * float(top), msg=key)


def test_pass_backward_without_a_callable_is_the_identity():
    x = torch.randn(3, requires_grad=True)
    step = losses.PassBackward()
    encoder_out = {"encoder_out": [x * 2], "encoder_padding_mask": [torch.zeros(3, dtype=torch.bool)]}
    assert step.shared(encoder_out) is encoder_out
    y = x.sum()
    assert step(lambda: 1 / 0, y)[0] is y  # the partial loss is not even formed
    assert step.finish(y) is y


def test_pass_backward_sums_the_passes_through_shared_leaves():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    calls = []
    step = losses.PassBackward(lambda loss: (calls.append(loss.item()), loss.backward()))
    shared = step.shared({"encoder_out": [torch.tanh(x)], "lengths": [torch.ones(4)]})
    assert shared["encoder_out"][0].is_leaf and not shared["lengths"][0].requires_grad
    h = shared["encoder_out"][0]
    a, = step(lambda: (h * 3).sum(), (h * 3).sum())
    b, = step(lambda: (h ** 2).sum(), (h ** 2).sum())
    assert x.grad is None  # the encoder's graph is kept until the end
    total = step.finish(a + b)
    assert not total.requires_grad and len(calls) == 2
    ref = torch.autograd.grad((torch.tanh(x) * 3 + torch.tanh(x) ** 2).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_label_smoothed_nll_from_logits_is_autograds_bit_for_bit(eps, dtype, tiny_chunks):
    tiny_chunks(2, 11)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=g)).to(dtype).requires_grad_(True)
    target = torch.randint(2, 11, (3, 5), generator=g)
    target[0, -2:] = PAD
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ls, nll = losses.label_smoothed_nll_from_logits(logits, target, PAD, eps)
    ref_ls, ref_nll = losses.label_smoothed_nll_per_position(losses.log_probs(logits), target, PAD, eps)
    assert torch.equal(ls, ref_ls) and torch.equal(nll, ref_nll) and not nll.requires_grad
    grad, = torch.autograd.grad((ls * weight).sum(), logits)
    ref, = torch.autograd.grad((ref_ls * weight).sum(), logits)
    assert grad.dtype == dtype and torch.equal(grad, ref)


def test_label_smoothed_nll_from_logits_refuses_a_second_backward():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    ls, _ = losses.label_smoothed_nll_from_logits(logits, torch.randint(2, 7, (2, 3)), PAD, 0.1)
    ls.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ls.sum().backward()
