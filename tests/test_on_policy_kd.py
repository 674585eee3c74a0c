"""``on_policy_kd`` (GKD, Agarwal et al., ICLR 2024): ``lambda = 0`` is ``word_kd``; the student's generation
(incremental, no gradient, EOS or length cap); the loss of mixed batches row by row; the random state
(saved, restored, rank-aware); the refusals; and through ``fairseq-train --user-dir``: SIGKILL and resume
equal to an uninterrupted run, and 2 CPU ranks equal to 1 rank with ``--update-freq 2``.
"""

import math
import os
import re
import subprocess
import sys
import types
from unittest import mock

import pytest
import torch
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions import on_policy_kd
from fairseq_kd.criterions.on_policy_kd import OnPolicyKDConfig, OnPolicyKDCriterion, student_translation
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from fairseq_kd.teacher.greedy import shift_right
from tests import cli, toy

PAD, EOS = 1, 2


def on_policy(task, **overrides):
    return OnPolicyKDCriterion(task, OnPolicyKDConfig(sentence_avg=False, seed=1, **overrides))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def setting(batch_size=4, seed=0):
    task = toy.make_task()
    return task, toy.make_model(task), toy.make_teacher(task), toy.make_sample(task, batch_size=batch_size, seed=seed)


# ---- lambda = 0 is word_kd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(kd_divergence="kl", kd_alpha=0.5),
    dict(kd_divergence="jsd", jsd_beta=0.3, kd_alpha=0.7, kd_temperature=2.0),
    dict(kd_divergence="srkl", skew_lambda=0.2, kd_alpha=1.0, label_smoothing=0.0),
])
@pytest.mark.parametrize("unit", ["batch", "sentence"])
def test_lambda_zero_equals_word_kd_loss_and_gradients(options, unit):
    task, model, teacher, sample = setting()
    results = []
    for criterion in (WordKDCriterion(task, WordKDConfig(sentence_avg=False, **options)),
                      on_policy(task, on_policy_lambda=0.0, on_policy_unit=unit, **options)):
        model.zero_grad()
        loss, sample_size, log = criterion(model, sample, teacher=teacher)
        loss.backward()
        results.append((loss.detach(), sample_size, log, grads(model)))
    (l1, n1, log1, g1), (l2, n2, log2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    assert n1 == n2 == sample["ntokens"]
    assert log2["kd_loss"].item() == pytest.approx(log1["kd_loss"].item(), rel=1e-6)
    assert log2["nll_loss"].item() == pytest.approx(log1["nll_loss"].item(), rel=1e-6)
    assert log2["on_policy_rows"].item() == 0 and log2["gold_tokens"].item() == sample["ntokens"]
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


def test_validation_is_the_gold_label_smoothed_nll():
    task, model, _, sample = setting()
    loss, sample_size, log = on_policy(task, on_policy_lambda=1.0)(model, sample)
    expected, _ = losses.label_smoothed_nll(model(**sample["net_input"])[0], sample["target"], PAD, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and "kd_loss" not in log


# ---- the student's generation -------------------------------------------------------------------------------


def test_generation_has_no_gradient_and_restores_the_mode():
    task, model, _, sample = setting()
    model.train()
    out = student_translation(model, sample["net_input"], PAD, EOS, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad and out.grad_fn is None and model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    student_translation(model, sample["net_input"], PAD, EOS)
    assert not model.training


def test_greedy_generation_is_the_argmax_of_a_full_forward_on_its_own_prefixes():
    # the incremental decoder gives what the whole-prefix decoder gives (eval mode), step by step
    task, model, _, sample = setting(batch_size=5, seed=3)
    out = student_translation(model, sample["net_input"], PAD, EOS, max_len_a=2.0, max_len_b=6)
    model.eval()
    with torch.no_grad():
        logits = model(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"],
                       shift_right(out, PAD, EOS))[0]
    logits[..., PAD] = -math.inf
    logits[:, 0, EOS] = -math.inf
    src_len = sample["net_input"]["src_tokens"].ne(PAD).sum(1) - 1
    budget = torch.floor(2.0 * src_len.double() + 6).long()
    for row in range(out.size(0)):
        n = int(out[row].ne(PAD).sum())
        for t in range(min(n, int(budget[row]))):  # positions whose EOS was not forced
            assert int(logits[row, t].argmax()) == int(out[row, t]), (row, t)


def well_formed(out):
    """Every row: non-pad tokens, one EOS, then pads only."""
    for row in out.tolist():
        n = row.index(EOS) + 1
        assert PAD not in row[:n] and all(tok == PAD for tok in row[n:]), row
        assert row[0] != EOS
    return [out[i].ne(PAD).sum().item() for i in range(out.size(0))]


def test_generation_stops_at_the_length_cap():
    task, model, _, sample = setting(batch_size=6, seed=1)
    src_len = sample["net_input"]["src_tokens"].ne(PAD).sum(1) - 1
    for a, b in ((0.0, 1), (0.0, 3), (0.5, 2)):
        out = student_translation(model, sample["net_input"], PAD, EOS, max_len_a=a, max_len_b=b, temperature=2.0,
                                  generator=torch.Generator().manual_seed(1))
        lengths = well_formed(out)
        for n, s in zip(lengths, src_len.tolist()):
            assert n <= math.floor(a * s + b) + 1  # the budget's tokens, then the forced EOS
    # the decoder's position limit caps the budget too
    out = student_translation(model, sample["net_input"], PAD, EOS, max_len_a=10.0, max_len_b=50, max_positions=4)
    assert max(well_formed(out)) <= 4


def test_generation_stops_at_eos_before_the_cap():
    task, model, _, sample = setting(batch_size=4, seed=2)
    output_layer = model.decoder.output_layer

    def eos_after_first(features):  # EOS is by far the best token (banned at the first step only)
        scores = output_layer(features)
        scores[..., EOS] += 100.0
        return scores

    model.decoder.output_layer = eos_after_first
    out = student_translation(model, sample["net_input"], PAD, EOS, max_len_a=3.0, max_len_b=20)
    assert out.size(1) == 2 and (out[:, 1] == EOS).all() and (out[:, 0] != EOS).all()


def test_sampling_is_reproducible_and_tempered():
    task, model, _, sample = setting(batch_size=6, seed=4)
    net_input = sample["net_input"]

    def sample_with(seed, temperature):
        return student_translation(model, net_input, PAD, EOS, temperature=temperature,
                                   generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample_with(7, 1.0), sample_with(7, 1.0))
    assert not torch.equal(sample_with(7, 1.0), sample_with(8, 1.0))
    greedy = student_translation(model, net_input, PAD, EOS)
    assert torch.equal(sample_with(7, 1e-4), greedy)  # a vanishing temperature is the argmax
    assert not torch.equal(sample_with(7, 50.0), greedy)
    well_formed(sample_with(9, 50.0))


# ---- the loss on generated rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit, lam", [("batch", 1.0), ("sentence", 0.5)])
def test_loss_is_the_divergence_on_generated_rows_and_word_kd_on_reference_rows(unit, lam):
    task, model, teacher, sample = setting(batch_size=6, seed=5)
    criterion = on_policy(task, on_policy_lambda=lam, on_policy_unit=unit, kd_alpha=0.6, kd_divergence="jsd",
                          jsd_beta=0.4, kd_temperature=1.5)
    mixed, rows = criterion.on_policy_sample(model, sample, teacher)
    assert 0 < int(rows.sum()) <= 6 and (unit == "sentence") == (0 < int(rows.sum()) < 6)
    criterion.calls = 0  # the forward below draws the same rows and translations
    model.zero_grad()
    loss, sample_size, log = criterion(model, sample, teacher=teacher)
    loss.backward()
    assert sample_size == mixed["ntokens"] and log["on_policy_rows"].item() == int(rows.sum())
    assert log["gen_tokens"].item() + log["gold_tokens"].item() == mixed["ntokens"]
    # the reference, row by row: (1 - a) LS + a t^2 JSD on reference rows, a t^2 JSD alone on generated rows
    # (gradient through the trained pass only: the generation's targets are constants)
    got = grads(model)
    model.zero_grad()
    logits = model(**mixed["net_input"])[0]
    with torch.no_grad():
        teacher_lprobs = teacher(mixed["net_input"])
    expected = 0.0
    for i in range(logits.size(0)):
        one = losses.word_kd_loss(logits[i:i + 1], losses.DenseTeacher(teacher_lprobs[i:i + 1]), mixed["target"][i:i + 1], PAD, 0.1, 0.6,
                                  1.5, True, "jsd", jsd_beta=0.4)
        if rows[i]:
            expected = expected + 0.6 * 1.5**2 * one[2]
        else:
            expected = expected + one[0]
            n = sample["target"][i].ne(PAD).sum()
            assert torch.equal(mixed["target"][i, :n], sample["target"][i, :n])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_task_train_step_scales_the_one_backward_like_fp16_loss_scaling():
    task, model, teacher, sample = setting()
    task.teacher = teacher
    results = []
    for scale in (1.0, 1024.0):
        criterion = on_policy(task, on_policy_lambda=1.0)
        model.zero_grad()
        optimizer = types.SimpleNamespace(backward=lambda loss, s=scale: (loss * s).backward())
        task.train_step(sample, model, criterion, optimizer, 0)
        results.append(grads(model))
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], 1024.0 * g, rtol=1e-5, atol=1e-6, msg=name)


def test_bfloat16_student():
    task, model, teacher, sample = setting()
    model = model.to(torch.bfloat16)
    loss, _, log = on_policy(task, on_policy_lambda=1.0)(model, sample, teacher=teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and log["on_policy_rows"].item() == 4
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_metrics_nll_over_reference_tokens_and_on_policy_share():
    logs = [dict(loss=10.0, nll_loss=6.0, ntokens=20, nsentences=4, sample_size=20, kd_loss=8.0, kd_agree=5,
                 kd_tokens=20, rows=4, on_policy_rows=3, gen_tokens=15, gold_tokens=5),
            dict(loss=4.0, nll_loss=0.0, ntokens=10, nsentences=2, sample_size=10, kd_loss=4.0, kd_agree=2,
                 kd_tokens=10, rows=2, on_policy_rows=2, gen_tokens=10, gold_tokens=0)]
    with metrics.aggregate(new_root=True) as agg:
        OnPolicyKDCriterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    assert values["nll_loss"] == pytest.approx(6.0 / 5 / math.log(2), abs=1e-3)
    assert values["loss"] == pytest.approx(14.0 / 30 / math.log(2), abs=1e-3)
    assert values["kd_loss"] == pytest.approx(12.0 / 30, abs=1e-4)
    assert values["on_policy_frac"] == pytest.approx(5 / 6, abs=1e-4)
    assert values["gen_len"] == pytest.approx(25 / 5, abs=1e-4)
    # validation (no teacher): word_kd's metrics only, the gold NLL over every token
    valid = [dict(loss=3.0, nll_loss=2.0, ntokens=10, nsentences=2, sample_size=10)]
    with metrics.aggregate(new_root=True) as agg:
        OnPolicyKDCriterion.reduce_metrics(valid)
        values = agg.get_smoothed_values()
    assert set(values) == {"loss", "nll_loss", "ppl"}
    assert values["nll_loss"] == pytest.approx(2.0 / 10 / math.log(2), abs=1e-3)


# ---- the random state ------------------------------------------------------------------------------------------


def test_random_state_is_saved_and_restored():
    task, model, teacher, sample = setting(batch_size=6, seed=6)
    a = on_policy(task, on_policy_lambda=0.5, on_policy_unit="sentence")
    draws = [a.on_policy_sample(model, sample, teacher) for _ in range(3)]
    assert a.kd_state_dict() == {"on_policy_calls": 3}
    b = on_policy(task, on_policy_lambda=0.5, on_policy_unit="sentence")
    b.load_kd_state_dict({"on_policy_calls": 2})
    mixed, rows = b.on_policy_sample(model, sample, teacher)
    assert torch.equal(rows, draws[2][1]) and torch.equal(mixed["target"], draws[2][0]["target"])
    assert not all(torch.equal(d[1], draws[0][1]) for d in draws[1:])  # the coins do change
    c = OnPolicyKDCriterion(task, OnPolicyKDConfig(sentence_avg=False, seed=2, on_policy_lambda=0.5,
                                                   on_policy_unit="sentence"))
    assert [torch.equal(c.on_policy_sample(model, sample, teacher)[1], d[1]) for d in draws] != [True] * 3


def test_ranks_draw_what_one_rank_draws_with_update_freq():
    # rank r's call c is the draw (c * world + r): 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches
    task = toy.make_task()
    one = on_policy(task)
    singles = [one.next_generators("cpu")[0].initial_seed() for _ in range(4)]
    pairs = []
    for rank in (0, 1):
        crit = on_policy(task)
        with mock.patch.object(on_policy_kd, "data_parallel_position", return_value=(rank, 2)):
            pairs.append([crit.next_generators("cpu")[0].initial_seed() for _ in range(2)])
    assert [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]] == singles
    assert len(set(singles)) == 4


# ---- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needle", [
    (dict(on_policy_lambda=1.5), "--on-policy-lambda must be in [0, 1]"),
    (dict(on_policy_lambda=math.nan), "--on-policy-lambda must be in [0, 1]"),
    (dict(on_policy_temperature=0.0), "--on-policy-temperature must be a finite number > 0"),
    (dict(on_policy_max_len_b=0), "--on-policy-max-len-b >= 1"),
    (dict(kd_topk_mode="no-top1"), "use word_kd for the ablations"),
    (dict(jsd_beta=1.0), "--jsd-beta must be in (0, 1)"),
])
def test_bad_flags_are_one_line_errors(overrides, needle):
    with pytest.raises(DistillationError) as info:
        on_policy(toy.make_task(), **overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cache_fully_sharded_and_left_padding_are_refused():
    task, model, teacher, sample = setting()
    assert "--teacher-path" in on_policy(task).teacher_cache_error({"k": 8})

    class FullyShardedDataParallel(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def set_num_updates(self, num_updates):
            self.module.set_num_updates(num_updates)

        def get_targets(self, sample, net_output):
            return self.module.get_targets(sample, net_output)

    task.teacher = teacher
    wrapped = FullyShardedDataParallel(model)
    backward = types.SimpleNamespace(backward=lambda loss: loss.backward())
    with pytest.raises(DistillationError, match=r"generates.*fully_sharded.*legacy_ddp"):
        task.train_step(sample, wrapped, on_policy(task, on_policy_lambda=1.0), backward, 0)
    assert all(p.grad is None for p in model.parameters())  # refused before the forward
    task.train_step(sample, wrapped, on_policy(task, on_policy_lambda=0.0), backward, 0)  # no generation: trains
    assert any(p.grad is not None for p in model.parameters())
    left = dict(sample, net_input=dict(sample["net_input"]))
    left["net_input"]["prev_output_tokens"] = sample["net_input"]["prev_output_tokens"].flip(1)
    with pytest.raises(DistillationError, match="--left-pad-target"):
        on_policy(task, on_policy_lambda=1.0)(model, left, teacher=teacher)


# ---- through the command-line tools ----------------------------------------------------------------------------

KD = ["--user-dir", cli.USER_DIR, "--task", "distillation_translation"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=cli.REPO)
ON_POLICY = ["--criterion", "on_policy_kd", "--on-policy-lambda", "0.5", "--on-policy-unit", "sentence",
             "--on-policy-max-len-b", "5"]


@pytest.mark.e2e
def test_sigkill_and_resume_equals_uninterrupted_with_update_freq(prepared, teacher_ckpt, tmp_path):
    from tests.test_faults import RESUME, assert_same_training_state, kill_after

    def cmd(save_dir):
        return [sys.executable, "-m", "fairseq_cli.train", prepared.bin, "--save-dir", save_dir, *cli.TINY_ARCH,
                *cli.TINY_OPTIM, *KD, "--teacher-path", teacher_ckpt, *ON_POLICY, "--update-freq", "2", *RESUME]

    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = cli.run("fairseq_cli.train", cmd(ref_dir)[3:])
    log = ref.stdout + ref.stderr
    fractions = [float(v) for v in re.findall(r"on_policy_frac[ =](\d+(?:\.\d+)?)", log)]
    assert len(fractions) >= 4 and all(0.0 <= f <= 1.0 for f in fractions) and 0 < sum(fractions) < len(fractions)
    assert re.search(r"gen_len[ =]\d", log) and re.search(r"kd_loss[ =]\d", log)
    kill_after(cmd(run_dir), 3, tmp_path / "killed.log")
    killed = torch.load(os.path.join(run_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert killed["optimizer_history"][-1]["num_updates"] == 2
    assert killed["task_state"]["criterion"] == {"on_policy_calls": 4}  # 2 updates x --update-freq 2
    resumed = cli.run("fairseq_cli.train", cmd(run_dir)[3:])
    assert "restored the training state of criterion OnPolicyKDCriterion" in resumed.stdout + resumed.stderr
    a = torch.load(os.path.join(ref_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(run_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert_same_training_state(a, b)  # same update count, weights, optimizer state and random state
    assert a["task_state"]["criterion"] == b["task_state"]["criterion"] == {"on_policy_calls": 8}


@pytest.mark.e2e
def test_two_cpu_ranks_equal_one_rank_with_double_update_freq(prepared, teacher_ckpt, tmp_path):
    from tests.test_faults import PARITY, PARITY_TOLERANCE, run_two_ranks

    flags = [*KD, "--teacher-path", teacher_ckpt, *ON_POLICY, *PARITY]
    one = str(tmp_path / "one")
    single = cli.train(prepared.bin, one, *flags, "--update-freq", "2")
    two = str(tmp_path / "two")
    procs = run_two_ranks(prepared.bin, two, flags, "legacy_ddp")
    for proc in procs:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a = torch.load(os.path.join(one, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(two, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 2
    assert b["cfg"]["distributed_training"]["distributed_world_size"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=PARITY_TOLERANCE, msg=key)
    assert a["task_state"]["criterion"] == {"on_policy_calls": 4} and b["task_state"]["criterion"] == {
        "on_policy_calls": 2}
    # generated rows were trained on (the same draws, hence the same translations, on both sides)
    fractions = [float(v) for v in re.findall(r"on_policy_frac[ =](\d+(?:\.\d+)?)", single.stdout + single.stderr)]
    assert fractions and sum(fractions) > 0


TORCH_DDP_RANK = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
from fairseq.distributed import ModuleProxyWrapper
from fairseq_kd.criterions.on_policy_kd import OnPolicyKDConfig, OnPolicyKDCriterion
from tests import toy
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
task = toy.make_task()
model = toy.make_model(task)
teacher = toy.make_teacher(task)
sample = toy.make_sample(task, seed=rank)  # each rank its own batch
wrapped = ModuleProxyWrapper(torch.nn.parallel.DistributedDataParallel(model))  # what fairseq's trainer builds
criterion = OnPolicyKDCriterion(task, OnPolicyKDConfig(sentence_avg=False, seed=1, on_policy_lambda=1.0))
loss, _, log = criterion(wrapped, sample, teacher=teacher)
loss.backward()
grad = model.encoder.layers[0].fc1.weight.grad.clone()
both = [torch.zeros_like(grad) for _ in range(2)]
dist.all_gather(both, grad)
print("GAP", float((both[0] - both[1]).abs().max()), "ROWS", int(log["on_policy_rows"]), "NORM", float(grad.norm()))
dist.destroy_process_group()
sys.stdout.flush()
import os
os._exit(0)
"""


@pytest.mark.e2e
def test_under_torch_ddp_the_gradients_of_the_generated_rows_are_all_reduced():
    """The generation reads the student's parts outside DDP's forward (no_grad); the trained pass goes
    through it, so torch's DDP all-reduces the gradient (both ranks hold the same one)."""
    script = TORCH_DDP_RANK.format(repo=cli.REPO, port=cli.free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=cli.REPO, env=ENV) for rank in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        gap, rows, norm = re.search(r"GAP (\S+) ROWS (\d+) NORM (\S+)", out).groups()
        assert float(gap) == 0.0 and int(rows) == 3 and float(norm) > 0
