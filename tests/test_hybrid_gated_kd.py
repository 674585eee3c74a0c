"""hybrid_gated_kd: acceptance identities, greedy-online target, gate checkpoints,
the non-collapse of a learned gate, and the pure gate functions."""

import io
import logging
import math

import pytest
import torch
from fairseq import utils as fairseq_utils
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions.hybrid_gated_kd import HybridGatedKDConfig, HybridGatedKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from fairseq_kd.modules.hybrid_gate import pooled_encoder_states
from fairseq_kd.teacher.greedy import greedy_teacher_translation, shift_right
from tests import toy

EPS = 0.1


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: thread start-up costs more than it saves on 2 shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setting(batch_size=4, seed=0):
    task = toy.make_task()
    model = toy.make_model(task, seed=0)
    teacher = toy.make_teacher(task, seeds=(1,))
    return task, model, teacher, toy.make_sample(task, batch_size=batch_size, seed=seed)


def criterion(task, **cfg):
    cfg.setdefault("sentence_avg", False)
    return HybridGatedKDCriterion(task, HybridGatedKDConfig(**cfg))


def with_teacher_target(task, sample, seed=7):
    """Offline Seq-KD keys, as the distillation task collates them, from a batch of another seed."""
    other = toy.make_sample(task, batch_size=sample["target"].size(0), seed=seed, min_len=3, max_len=8)
    sample = dict(sample)
    sample["teacher_target"] = other["target"]
    sample["teacher_prev_output_tokens"] = other["net_input"]["prev_output_tokens"]
    sample["teacher_ntokens"] = other["ntokens"]
    return sample


def student_logits(model, sample, prev_output_tokens):
    net_input = sample["net_input"]
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    return model.decoder(prev_output_tokens, encoder_out=encoder_out)[0]


def grads(module):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


# -- acceptance identities ---------------------------------------------------------


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (1.0, 1.0), (0.3, 2.0)])
def test_fixed_gate_one_is_word_kd(alpha, tau):
    task, model, teacher, sample = setting()
    hybrid = criterion(task, gate="fixed", gate_fixed_value=1.0, kd_alpha=alpha, kd_temperature=tau)
    word = WordKDCriterion(task, WordKDConfig(kd_alpha=alpha, kd_temperature=tau, sentence_avg=False))

    loss, size, log = hybrid(model, sample, teacher=teacher)
    loss.backward()
    hybrid_grads = grads(model)
    model.zero_grad()
    ref, ref_size, ref_log = word(model, sample, teacher=teacher)
    ref.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert size == ref_size == sample["ntokens"]
    assert float(log["tok_loss"]) == pytest.approx(float(ref_log["kd_loss"]), rel=1e-6)
    assert log["kd_agree"] == ref_log["kd_agree"]
    for a, b in zip(hybrid_grads, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert "sent_loss" not in log  # G = 1: the sentence level is not even decoded
    if alpha == 1.0:  # the KD part alone
        kl = losses.kl_divergence(
            student_logits(model, sample, sample["net_input"]["prev_output_tokens"]),
            teacher(sample["net_input"]), sample["target"], task.target_dictionary.pad(), temperature=tau,
        )
        assert loss.item() == pytest.approx(kl.item(), rel=1e-6)


def test_fixed_gate_zero_is_seq_kd_on_the_offline_target():
    task, model, teacher, sample = setting()
    sample = with_teacher_target(task, sample)
    crit = criterion(task, gate="fixed", gate_fixed_value=0.0, kd_alpha=1.0, hybrid_sent_target="offline")
    assert crit.needs_teacher_target
    loss, size, log = crit(model, sample, teacher=teacher)

    pad = task.target_dictionary.pad()
    logits = student_logits(model, sample, sample["teacher_prev_output_tokens"])
    ref, ref_nll = losses.label_smoothed_nll(logits, sample["teacher_target"], pad, EPS)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert float(log["sent_loss"]) == pytest.approx(ref.item(), rel=1e-6)
    assert float(log["sent_nll"]) == pytest.approx(ref_nll.item(), rel=1e-6)
    assert log["sent_tokens"] == sample["teacher_ntokens"]
    assert "tok_loss" not in log


@pytest.mark.parametrize("gate", [0.0, 0.4])
def test_fixed_gate_on_teacher_prefixes_is_the_seq_kd_criterion(gate):
    """G = 0 is seq_kd; with token-level prefixes on the teacher target, G = a is
    seq_kd --kd-alpha a (Word-KD + Seq-KD): same loss sum, same gradients."""
    from fairseq_kd.criterions.seq_kd import SeqKDConfig, SeqKDCriterion

    task, model, teacher, sample = setting()
    sample = with_teacher_target(task, sample)
    hybrid = criterion(
        task, gate="fixed", gate_fixed_value=gate, kd_alpha=1.0, kd_temperature=2.0,
        hybrid_sent_target="offline", hybrid_token_prefix="teacher",
    )
    seq = SeqKDCriterion(task, SeqKDConfig(kd_alpha=gate, kd_temperature=2.0, sentence_avg=False))
    loss, _, _ = hybrid(model, sample, teacher=teacher)
    loss.backward()
    hybrid_grads = grads(model)
    model.zero_grad()
    ref, _, _ = seq(model, sample, teacher=teacher if gate > 0 else None)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(hybrid_grads, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fixed_gate_zero_greedy_online_trains_on_the_greedy_translation():
    task, model, teacher, sample = setting()
    d = task.target_dictionary
    crit = criterion(task, gate="fixed", gate_fixed_value=0.0, kd_alpha=1.0)
    assert not crit.needs_teacher_target
    loss, _, log = crit(model, sample, teacher=teacher)

    hyp = greedy_teacher_translation(teacher, sample["net_input"], d.pad(), d.eos(), 1.2, 10, 64)
    ref, _ = losses.label_smoothed_nll(
        student_logits(model, sample, hyp["prev_output_tokens"]), hyp["target"], d.pad(), EPS
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert log["sent_tokens"] == hyp["ntokens"]


@pytest.mark.parametrize("prefix", ["gold", "teacher"])
def test_fixed_gate_mixes_both_levels(prefix):
    gate, alpha, tau = 0.3, 0.6, 2.0
    task, model, teacher, sample = setting()
    sample = with_teacher_target(task, sample)
    pad = task.target_dictionary.pad()
    crit = criterion(
        task, gate="fixed", gate_fixed_value=gate, kd_alpha=alpha, kd_temperature=tau,
        hybrid_sent_target="offline", hybrid_token_prefix=prefix,
    )
    loss, _, log = crit(model, sample, teacher=teacher)

    gold_prev, hyp_prev = sample["net_input"]["prev_output_tokens"], sample["teacher_prev_output_tokens"]
    gold_logits, hyp_logits = student_logits(model, sample, gold_prev), student_logits(model, sample, hyp_prev)
    sent, _ = losses.label_smoothed_nll(hyp_logits, sample["teacher_target"], pad, EPS)
    gold_ls, _ = losses.label_smoothed_nll(gold_logits, sample["target"], pad, EPS)
    if prefix == "gold":
        kl = losses.kl_divergence(gold_logits, teacher(sample["net_input"]), sample["target"], pad, tau)
    else:
        kl = losses.kl_divergence(
            hyp_logits, teacher(sample["net_input"], hyp_prev), sample["teacher_target"], pad, tau
        )
    expected = alpha * (gate * tau**2 * kl + (1 - gate) * sent) + (1 - alpha) * gold_ls
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert float(log["tok_loss"]) == pytest.approx(kl.item(), rel=1e-6)
    assert float(log["sent_loss"]) == pytest.approx(sent.item(), rel=1e-6)
    assert log["gate_sum"] / log["gate_count"] == pytest.approx(gate)


def test_validation_is_the_gold_label_smoothed_nll():
    task, model, _, sample = setting()
    loss, size, log = criterion(task, gate="scalar")(model, sample)
    ref, ref_nll = losses.label_smoothed_nll(model(**sample["net_input"])[0], sample["target"], 1, EPS)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert size == sample["ntokens"]
    assert "gate_sum" not in log and "tok_loss" not in log


# -- sentence-level target ------------------------------------------------------------


def eos_prone_teacher(task, strength=1.5):
    """The toy teacher with a perturbed EOS output row: some rows end on their own,
    the others run into the length budget."""
    teacher = toy.make_teacher(task, seeds=(1,))
    weight = teacher.models[0].decoder.output_projection.weight
    noise = torch.randn(weight.size(1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weight[task.target_dictionary.eos()] += strength * weight.std() * noise
    return teacher


def test_greedy_online_target_is_the_teacher_argmax_on_itself():
    task = toy.make_task()
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    teacher = eos_prone_teacher(task)
    sample = toy.make_sample(task, batch_size=6, seed=0)
    a, b = 1.2, 10
    hyp = greedy_teacher_translation(teacher, sample["net_input"], pad, eos, a, b, 64)
    target, prev = hyp["target"], hyp["prev_output_tokens"]

    lengths = target.ne(pad).sum(dim=1)
    src = sample["net_input"]["src_tokens"]
    budget = torch.floor(a * (src.ne(pad) & src.ne(eos)).sum(dim=1).double() + b).long()
    assert (lengths <= budget + 1).all()
    forced = lengths.eq(budget + 1)
    assert forced.any() and (~forced).any()  # both ways of ending are exercised
    # right-padded, one EOS per row, last; prev is the collater's shift
    assert target.gather(1, (lengths - 1).unsqueeze(1)).eq(eos).all()
    assert target.eq(eos).sum(dim=1).eq(1).all()
    assert hyp["ntokens"] == int(lengths.sum())
    torch.testing.assert_close(prev, shift_right(target, pad, eos))
    assert prev[:, 0].eq(eos).all()

    # teacher forcing on y_hat: the (constrained) argmax reproduces y_hat except where EOS was forced
    lprobs = teacher(sample["net_input"], prev).clone()
    lprobs[:, :, pad] = -math.inf
    lprobs[:, 0, eos] = -math.inf
    argmax = lprobs.argmax(dim=-1)
    check = target.ne(pad)
    check[forced, lengths[forced] - 1] = False
    assert check.sum() > 10
    assert torch.equal(argmax[check], target[check])
    # the decoder's own log-probabilities are those of teacher forcing on y_hat
    valid = target.ne(pad)
    torch.testing.assert_close(hyp["teacher_lprobs"][valid], teacher(sample["net_input"], prev)[valid])


def test_greedy_online_respects_max_positions_and_budget():
    task = toy.make_task()
    d = task.target_dictionary
    teacher = toy.make_teacher(task, seeds=(1,))
    sample = toy.make_sample(task, batch_size=3, seed=1)
    hyp = greedy_teacher_translation(teacher, sample["net_input"], d.pad(), d.eos(), 0.0, 3, 64)
    assert hyp["target"].size(1) <= 4
    hyp = greedy_teacher_translation(teacher, sample["net_input"], d.pad(), d.eos(), 1.2, 10, 5)
    assert hyp["target"].size(1) <= 5 and hyp["target"].ne(d.pad()).sum(1).le(5).all()


def test_offline_target_missing_is_a_one_line_error():
    task, model, teacher, sample = setting()
    crit = criterion(task, gate="scalar", hybrid_sent_target="offline")
    with pytest.raises(DistillationError) as err:
        crit(model, sample, teacher=teacher)
    assert "teacher_target" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(gate="fixed", gate_fixed_value=1.5),
        dict(gate_init=0.0),
        dict(gate_init=1.0),
        dict(gate_prior=1.0),
        dict(gate_prior_weight=-0.1),
        dict(gate="sentence"),
        dict(gate="token", gate_input_dim=16),  # token gate on gold prefixes
        dict(hybrid_max_len_b=0),
        dict(kd_alpha=1.5),
    ],
)
def test_bad_flags(cfg):
    with pytest.raises(DistillationError) as err:
        criterion(toy.make_task(), **cfg)
    assert "\n" not in str(err.value)


def test_wrong_gate_input_dim_is_named():
    task, model, teacher, sample = setting()
    crit = criterion(task, gate="sentence", gate_input_dim=8)
    with pytest.raises(DistillationError, match="--gate-input-dim 16"):
        crit(model, sample, teacher=teacher)


# -- the gate as a trained, checkpointed module ---------------------------------------

LEARNED = [
    dict(gate="scalar"),
    dict(gate="sentence", gate_input_dim=16),
    dict(gate="token", gate_input_dim=16, hybrid_token_prefix="teacher"),
]


def randomise(crit, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crit.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("cfg", LEARNED, ids=lambda c: c["gate"])
def test_gate_state_survives_a_checkpoint_round_trip(cfg):
    task, model, teacher, sample = setting()
    trained = criterion(task, **cfg)
    assert fairseq_utils.has_parameters(trained)  # so the trainer optimises, saves and restores it
    assert all(p.dim() >= 1 for p in trained.parameters())  # legacy_ddp cannot all-reduce 0-dim grads
    randomise(trained)
    _, _, log = trained(model, sample, teacher=teacher)

    fresh = criterion(task, **cfg)
    _, _, fresh_log = fresh(model, sample, teacher=teacher)
    assert fresh_log["gate_sum"] != pytest.approx(log["gate_sum"])

    buffer = io.BytesIO()
    torch.save({"criterion": trained.state_dict()}, buffer)
    buffer.seek(0)
    for state in (trained.state_dict(), torch.load(buffer, weights_only=True)["criterion"]):
        restored = criterion(task, **cfg)
        restored.load_state_dict(state)
        loss, _, restored_log = restored(model, sample, teacher=teacher)
        for key in ("gate_sum", "gate_sq_sum", "gate_count", "gate_obj"):
            assert float(restored_log[key]) == pytest.approx(float(log[key]), rel=1e-6), key


def test_fixed_gate_has_no_state():
    crit = criterion(toy.make_task(), gate="fixed", gate_fixed_value=0.4)
    assert not fairseq_utils.has_parameters(crit) and crit.state_dict() == {}


def test_loading_a_mismatched_gate_is_a_clear_error(caplog):
    task = toy.make_task()
    scalar = criterion(task, gate="scalar").state_dict()
    with pytest.raises(DistillationError, match="--gate sentence"):
        criterion(task, gate="sentence", gate_input_dim=16).load_state_dict(scalar)
    with pytest.raises(DistillationError):
        criterion(task, gate="sentence", gate_input_dim=8).load_state_dict(
            criterion(task, gate="sentence", gate_input_dim=16).state_dict()
        )
    # a checkpoint written without criterion state (e.g. by word_kd): keep --gate-init
    crit = criterion(task, gate="scalar", gate_init=0.25)
    with caplog.at_level(logging.WARNING):
        crit.load_state_dict(None)
    assert torch.sigmoid(crit.gate.logit).item() == pytest.approx(0.25)
    assert "no criterion state" in caplog.text


@pytest.mark.parametrize("cfg", LEARNED, ids=lambda c: c["gate"])
def test_gate_objective_reaches_only_the_gate(cfg):
    """Changing the gate's objective (its prior weight) changes the gate's gradient but
    neither the loss value nor any gradient of the translation model."""
    task, model, teacher, sample = setting()
    results = []
    for prior_weight in (0.0, 5.0):
        crit = criterion(task, gate_prior_weight=prior_weight, **cfg)
        randomise(crit)
        model.zero_grad()
        loss, _, log = crit(model, sample, teacher=teacher)
        loss.backward()
        results.append((loss.item(), grads(model), grads(crit), float(log["gate_obj"])))
    (loss0, model0, gate0, obj0), (loss1, model1, gate1, obj1) = results
    assert loss0 == pytest.approx(loss1, rel=1e-6)
    for a, b in zip(model0, model1):
        torch.testing.assert_close(a, b)
    assert obj0 != pytest.approx(obj1)
    assert all(g.abs().sum() > 0 for g in gate0 + gate1)  # not a stub: the gate is trained
    assert any(not torch.allclose(a, b) for a, b in zip(gate0, gate1))


def test_learned_scalar_weights_the_student_like_a_fixed_gate():
    task, model, teacher, sample = setting()
    out = []
    for cfg in (dict(gate="scalar", gate_init=0.3), dict(gate="fixed", gate_fixed_value=0.3)):
        model.zero_grad()
        loss, _, _ = criterion(task, kd_alpha=0.7, **cfg)(model, sample, teacher=teacher)
        loss.backward()
        out.append((loss.item(), grads(model)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_reduce_metrics_logs_gate_spread_and_both_levels():
    task, model, teacher, _ = setting()
    crit = criterion(task, gate="sentence", gate_input_dim=16)
    randomise(crit)
    logs, gates = [], []
    for seed in (0, 1):
        sample = toy.make_sample(task, batch_size=4, seed=seed)
        logs.append(crit(model, sample, teacher=teacher)[2])
        net_input = sample["net_input"]
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        gates.append(torch.sigmoid(crit.gate(pooled_encoder_states(encoder_out))).detach().double())
    gates = torch.cat(gates)
    with metrics.aggregate() as agg:
        HybridGatedKDCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert float(values["gate_mean"]) == pytest.approx(gates.mean().item(), abs=1e-4)
    assert float(values["gate_std"]) == pytest.approx(gates.std(unbiased=False).item(), abs=1e-4)
    assert values["gate_std"] > 0.01
    tok = sum(float(log["tok_loss"]) for log in logs) / sum(float(log["tok_tokens"]) for log in logs)
    sent = sum(float(log["sent_loss"]) for log in logs) / sum(float(log["sent_tokens"]) for log in logs)
    assert float(values["tok_loss"]) == pytest.approx(tok, abs=1e-4)
    assert float(values["sent_loss"]) == pytest.approx(sent, abs=1e-4)
    assert {"loss", "nll_loss", "ppl", "kd_top1_agree", "gate_obj", "sent_nll", "sent_len_ratio"} <= set(values)
    assert HybridGatedKDCriterion.logging_outputs_can_be_summed()


# -- non-collapse ---------------------------------------------------------------------


def free_student_loop(prior_weight, steps=300, vocab=8, positions=4, seed=0):
    """Toy losses: a free student (one logit vector per position) trained on the
    hybrid loss, a scalar gate on ``losses.gate_objective``; one Adam for both."""
    g = torch.Generator().manual_seed(seed)
    teacher_lprobs = losses.log_probs(2.0 * torch.randn(positions, vocab, generator=g, dtype=torch.float64))
    y_hat = teacher_lprobs.argmax(dim=-1)
    theta = torch.zeros(positions, vocab, dtype=torch.float64, requires_grad=True)
    z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta, z], lr=0.05)
    mask = torch.ones(positions, dtype=torch.bool)
    count = torch.tensor(float(positions), dtype=torch.float64)
    floor = losses.label_smoothing_floor(EPS, vocab)
    for _ in range(steps):
        lprobs = torch.log_softmax(theta, dim=-1)
        token = losses.kl_from_log_probs(lprobs, teacher_lprobs, mask).sum()
        sent = losses.label_smoothed_nll_per_position(lprobs, y_hat, -1, EPS)[0].sum()
        student = losses.gated_mixture(token, sent, torch.sigmoid(z).detach())
        objective = losses.gate_objective(z, token, sent - floor * count, count, count, 0.5, prior_weight)
        optimizer.zero_grad()
        ((student + objective - objective.detach()) / positions).backward()
        optimizer.step()
    gap = (token - (sent - floor * count)).item() / positions
    return torch.sigmoid(z).item(), gap


def test_free_student_gate_settles_at_the_prior_equilibrium_and_collapses_without_it():
    gate, gap = free_student_loop(prior_weight=0.5)
    assert 0.1 < gate < 0.9
    expected = losses.gate_equilibrium(torch.tensor(gap), 0.5, 0.5).item()
    assert gate == pytest.approx(expected, abs=5e-3)
    collapsed, _ = free_student_loop(prior_weight=0.0)
    assert collapsed > 0.95 or collapsed < 0.05


def criterion_loop(gate, prior_weight, steps=250, gate_lr=0.05):
    """The real criterion on the toy Transformer: model and gate parameters in one
    Adam, as fairseq's trainer does (the gate in its own group with a larger lr so
    that a few hundred steps show where it goes)."""
    task, model, teacher, sample = setting(batch_size=4)
    d = task.target_dictionary
    hyp = greedy_teacher_translation(teacher, sample["net_input"], d.pad(), d.eos(), 1.0, 2, 64)
    sample.update(
        teacher_target=hyp["target"], teacher_prev_output_tokens=hyp["prev_output_tokens"],
        teacher_ntokens=hyp["ntokens"],
    )
    crit = criterion(
        task, gate=gate, gate_input_dim=16, gate_prior_weight=prior_weight, hybrid_sent_target="offline"
    )
    optimizer = torch.optim.Adam(
        [{"params": list(model.parameters()), "lr": 3e-3}, {"params": list(crit.parameters()), "lr": gate_lr}]
    )
    history = []
    for _ in range(steps):
        loss, sample_size, log = crit(model, sample, teacher=teacher)
        optimizer.zero_grad()
        (loss / sample_size).backward()
        optimizer.step()
        history.append((
            log["gate_sum"] / log["gate_count"],
            float(log["tok_loss"]) / log["tok_tokens"],
            float(log["sent_loss"]) / log["sent_tokens"],
        ))
    return history


@pytest.mark.parametrize("gate", ["scalar", "sentence"])
def test_learned_gate_stays_inside_with_the_prior_and_collapses_without(gate):
    history = criterion_loop(gate, prior_weight=1.0)
    (_, tok0, sent0), (final_gate, tok1, sent1) = history[0], history[-1]
    assert 0.1 < final_gate < 0.9
    # early on the token level is much easier to fit and the gate leans toward it
    # (its equilibrium moves with the loss gap), but never to the edge
    assert max(g for g, _, _ in history) < 0.95 and min(g for g, _, _ in history) > 0.05
    assert all(0.1 < g < 0.9 for g, _, _ in history[len(history) // 2:])
    assert tok1 < 0.5 * tok0 and sent1 < 0.5 * sent0  # both levels are learned

    collapsed = criterion_loop(gate, prior_weight=0.0)
    final_gate, _, sent_collapsed = collapsed[-1]
    assert final_gate > 0.95 or final_gate < 0.05
    # the level the gate abandoned is learned worse than with the prior
    assert sent_collapsed > sent1 + 0.1 if final_gate > 0.5 else collapsed[-1][1] > tok1 + 0.1


# -- pure gate functions (fairseq_kd.losses) -------------------------------------------


def test_gated_mixture_gradcheck_and_value():
    g = torch.Generator().manual_seed(0)
    token = torch.rand(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    sent = torch.rand(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.gated_mixture, (token, sent, gate))
    assert losses.gated_mixture(token, sent, gate).item() == pytest.approx(
        (gate * token + (1 - gate) * sent).sum().item()
    )
    assert losses.gated_mixture(token, sent, 1.0).item() == pytest.approx(token.sum().item())
    assert losses.gated_mixture(token, sent, 0.0).item() == pytest.approx(sent.sum().item())


def test_bernoulli_kl_gradcheck_and_value():
    logits = torch.tensor([-30.0, -4.0, -0.3, 0.0, 1.2, 30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: losses.bernoulli_kl_from_logits(z, 0.3), (logits,))
    # G = 0.5 against a prior of 0.25: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    value = losses.bernoulli_kl_from_logits(torch.zeros(1, dtype=torch.float64), 0.25).item()
    assert value == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    kl = losses.bernoulli_kl_from_logits(logits, 0.3)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert losses.bernoulli_kl_from_logits(torch.tensor([math.log(0.3 / 0.7)]), 0.3).abs().item() < 1e-7
    # d/dz KL = sigmoid'(z) (z - logit(prior))
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(grad, s * (1 - s) * (logits.detach() - math.log(0.3 / 0.7)))


def test_gate_objective_gradcheck_detaches_the_losses_and_skips_empty_units():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    token = torch.rand(5, generator=g, dtype=torch.float64, requires_grad=True) * 4
    sent = torch.rand(5, generator=g, dtype=torch.float64) * 4
    token_count = torch.tensor([3.0, 4.0, 0.0, 2.0, 5.0], dtype=torch.float64)
    sent_count = torch.tensor([2.0, 4.0, 0.0, 3.0, 6.0], dtype=torch.float64)

    def objective(z):
        return losses.gate_objective(z, token, sent, token_count, sent_count, 0.4, 0.7)

    assert torch.autograd.gradcheck(objective, (logits,))
    value = objective(logits)
    gap = token.detach() / token_count.clamp(min=1) - sent / sent_count.clamp(min=1)
    weight = (token_count + sent_count) / 2
    expected = weight * (torch.sigmoid(logits) * gap + 0.7 * losses.bernoulli_kl_from_logits(logits, 0.4))
    assert value.item() == pytest.approx(expected.sum().item(), rel=1e-12)
    (grad_z, grad_token) = torch.autograd.grad(value, (logits, token), allow_unused=True)
    assert grad_token is None  # the gate's objective never trains the student
    assert grad_z[2] == 0  # a unit without tokens


def test_gate_equilibrium_is_the_minimum_of_the_objective():
    gap, prior, weight = 0.8, 0.4, 0.5
    expected = losses.gate_equilibrium(torch.tensor(gap, dtype=torch.float64), prior, weight)
    z = torch.logit(expected).clone().requires_grad_(True)
    one = torch.ones((), dtype=torch.float64)
    objective = losses.gate_objective(z, gap * one, 0 * one, one, one, prior, weight)
    (grad,) = torch.autograd.grad(objective, z)
    assert abs(grad.item()) < 1e-12
    grid = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    values = torch.sigmoid(grid) * gap + weight * losses.bernoulli_kl_from_logits(grid, prior)
    assert torch.sigmoid(grid[values.argmin()]).item() == pytest.approx(expected.item(), abs=1e-3)
    with pytest.raises(ValueError):
        losses.gate_equilibrium(torch.tensor(gap), prior, 0.0)


def test_label_smoothing_floor_is_the_minimum_of_the_label_smoothed_nll():
    vocab, eps = 7, 0.1
    target = torch.tensor([[2]])
    q = torch.full((1, 1, vocab), eps / (vocab - 1), dtype=torch.float64)
    q[0, 0, 2] = 1 - eps
    at_q, _ = losses.nll_from_log_probs(q.log(), target, -1, eps)
    assert at_q.item() == pytest.approx(losses.label_smoothing_floor(eps, vocab), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lprobs = torch.log_softmax(3 * torch.randn(1, 1, vocab, generator=g, dtype=torch.float64), -1)
        loss, _ = losses.nll_from_log_probs(lprobs, target, -1, eps)
        excess = loss.item() - losses.label_smoothing_floor(eps, vocab)
        kl_q = (q * (q.log() - lprobs)).sum().item()
        assert excess == pytest.approx(kl_q, rel=1e-9)  # LS-NLL - floor = KL(q || p_s) >= 0
    assert losses.label_smoothing_floor(0.0, vocab) == 0.0


def test_label_smoothed_nll_per_position_sums_to_label_smoothed_nll():
    g = torch.Generator().manual_seed(2)
    lprobs = torch.log_softmax(torch.randn(3, 5, 9, generator=g, dtype=torch.float64), -1)
    target = torch.randint(2, 9, (3, 5), generator=g)
    target[0, 3:] = 1
    loss, nll = losses.label_smoothed_nll_per_position(lprobs, target, 1, EPS)
    ref_loss, ref_nll = losses.nll_from_log_probs(lprobs, target, 1, EPS)
    assert loss.sum().item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert nll.sum().item() == pytest.approx(ref_nll.item(), rel=1e-12)
    assert (loss[0, 3:] == 0).all()


# -- through fairseq-train --------------------------------------------------------------


@pytest.mark.e2e
def test_fairseq_train_optimises_saves_and_restores_the_gate(prepared, teacher_ckpt, tmp_path):
    import re

    from tests import cli

    save_dir = str(tmp_path / "hybrid")
    flags = [
        "--user-dir", cli.USER_DIR, "--task", "distillation_translation", "--teacher-path", teacher_ckpt,
        "--criterion", "hybrid_gated_kd", "--gate", "sentence", "--gate-input-dim", "32",
        "--log-interval", "1",
    ]
    proc = cli.train(prepared.bin, save_dir, *flags, "--max-update", "6")
    log = proc.stdout + proc.stderr
    for key in ("gate_mean", "gate_std", "tok_loss", "sent_loss", "gate_obj"):
        assert re.search(rf"{key}[ =]-?\d+(\.\d+)?", log), key
    valid_lines = [line for line in log.splitlines() if "| valid |" in line]
    assert valid_lines and not any("gate" in line or "sent_" in line for line in valid_lines)
    checkpoint = f"{save_dir}/checkpoint_last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert set(state["criterion"]) == {"gate.proj.weight", "gate.proj.bias"}
    assert state["criterion"]["gate.proj.weight"].abs().sum() > 0  # moved from its zero init

    # resume from a gate set to G = 0.95 everywhere: the next update must see it
    state["criterion"]["gate.proj.weight"].zero_()
    state["criterion"]["gate.proj.bias"].fill_(math.log(0.95 / 0.05))
    torch.save(state, checkpoint)
    proc = cli.train(prepared.bin, save_dir, *flags, "--max-update", "7")
    means = [float(v) for v in re.findall(r"gate_mean[ =](\d+\.\d+)", proc.stdout + proc.stderr)]
    assert means and means[0] == pytest.approx(0.95, abs=2e-3)

    # a different gate cannot silently resume from it
    proc = cli.train(
        prepared.bin, save_dir, *flags[:-4], "--gate", "scalar", "--log-interval", "1", "--max-update", "8",
        check=False,
    )
    assert proc.returncode != 0 and "resume with the --gate" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_two_process_data_parallel_all_reduces_the_gate(prepared, teacher_ckpt, tmp_path):
    """With parameters, the criterion is wrapped in fairseq's DDP like the model."""
    import os
    import socket
    import subprocess
    import sys

    from tests import cli

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    save_dir = str(tmp_path / "ddp")
    procs = []
    for rank in range(2):
        cmd = [
            sys.executable, "-m", "fairseq_cli.train", prepared.bin, "--save-dir", save_dir,
            *cli.TINY_ARCH, *cli.TINY_OPTIM, "--user-dir", cli.USER_DIR, "--task", "distillation_translation",
            "--teacher-path", teacher_ckpt, "--criterion", "hybrid_gated_kd", "--gate", "scalar",
            "--max-update", "4", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--distributed-world-size", "2", "--distributed-rank", str(rank), "--distributed-no-spawn",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}",
        ]
        procs.append(subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cli.REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        ))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    assert state["criterion"]["gate.logit"].shape == (1,) and state["criterion"]["gate.logit"].item() != 0
