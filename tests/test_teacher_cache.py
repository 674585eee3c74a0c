"""The offline teacher cache: top-k + tail losses, the criterions' cached branch, the build
(round trip, shards, resume after a kill, manifest refusals), data-parallel training from the
cache, and a student trained from the cache against the live-teacher student."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fairseq_kd import losses
from fairseq_kd.cache.build import teacher_topk
from fairseq_kd.cache.dataset import IDS_KEY, LPROBS_KEY, TAIL_KEY, TeacherCache
from fairseq_kd.cache.manifest import read_manifest
from fairseq_kd.criterions.hybrid_gated_kd import HybridGatedKDConfig, HybridGatedKDCriterion
from fairseq_kd.criterions.selective_kd import SelectiveKDConfig, SelectiveKDCriterion
from fairseq_kd.criterions.self_evolution_kd import SelfEvolutionKDConfig, SelfEvolutionKDCriterion
from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from fairseq_kd.teacher.cached import CachedTeacher
from tests import cli, toy

KD = ["--user-dir", cli.USER_DIR, "--task", "distillation_translation"]


# -- the top-k + tail maths ---------------------------------------------------------


def test_bucketed_kl_hand_computed():
    # teacher [0.5, 0.3, 0.15, 0.05], k = 2 -> buckets [0.5, 0.3, 0.2]; uniform student -> [0.25, 0.25, 0.5]
    teacher = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()
    ids = torch.tensor([[[0, 1]]])
    student = torch.full((1, 1, 4), math.log(0.25), dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    tail = torch.tensor([[math.log(0.2)]], dtype=torch.float64)
    kl = losses.TopKTeacher(ids, teacher[:2].view(1, 1, 2), tail).divergence(student, mask, "kl")
    expected = 0.5 * math.log(2.0) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    assert kl.item() == pytest.approx(expected, rel=1e-12)
    rkl = losses.TopKTeacher(ids, teacher[:2].view(1, 1, 2), tail).divergence(student, mask, "rkl")
    assert rkl.item() == pytest.approx(0.25 * math.log(0.5) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(2.5), rel=1e-12)
    assert losses.bucket_target(torch.tensor([[1, 3]]), torch.tensor([[[0, 1], [0, 1]]])).tolist() == [[1, 2]]


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_full_k_equals_full_vocabulary_loss(divergence):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 12), 2 * torch.randn(2, 5, 12)
    target = torch.randint(2, 12, (2, 5))
    target[1, 3:] = 1
    ids, values, tail = losses.topk_with_tail(losses.log_probs(teacher), 12)
    full = losses.word_kd_loss(student, losses.DenseTeacher.from_logits(teacher), target, 1, 0.1, 0.5, divergence=divergence)
    cached = losses.word_kd_loss(student, losses.TopKTeacher(ids, values, tail), target, 1, 0.1, 0.5, divergence=divergence)
    for a, b in zip(full, cached):
        assert b.item() == pytest.approx(a.item(), rel=1e-5, abs=1e-5)
    # with k < V the bucketed divergence is a lower bound (grouping never increases an f-divergence)
    ids3, values3, tail3 = losses.topk_with_tail(losses.log_probs(teacher), 3)
    small = losses.word_kd_loss(student, losses.TopKTeacher(ids3, values3, tail3), target, 1, 0.1, 0.5, divergence=divergence)
    assert 0 < small[2].item() < full[2].item()


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_topk_divergence_gradcheck(divergence):
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    ids, values, tail = losses.topk_with_tail(losses.log_probs(torch.randn(2, 3, 7, dtype=torch.float64)), 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def f(x):
        return losses.TopKTeacher(ids, values, tail).divergence(losses.log_probs(x), mask, divergence, 0.2).sum()

    assert torch.autograd.gradcheck(f, (logits,))


def test_bucketed_kl_gradient_is_exact_on_the_top_k():
    torch.manual_seed(3)
    logits = torch.randn(1, 1, 9, dtype=torch.float64, requires_grad=True)
    teacher = losses.log_probs(torch.randn(1, 1, 9, dtype=torch.float64))
    ids, values, tail_lp = losses.topk_with_tail(teacher, 3)
    kl = losses.TopKTeacher(ids, values, tail_lp).divergence(losses.log_probs(logits), torch.ones(1, 1, dtype=torch.bool), "kl")
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    p_s, p_t = losses.log_probs(logits).exp().detach()[0, 0], teacher.exp()[0, 0]
    top = ids[0, 0]
    tail = torch.ones(9, dtype=torch.bool)
    tail[top] = False
    assert torch.allclose(grad[0, 0, top], p_s[top] - p_t[top], atol=1e-12)
    ratio = p_t[tail].sum() / p_s[tail].sum()
    assert torch.allclose(grad[0, 0, tail], p_s[tail] * (1 - ratio), atol=1e-12)


def test_tie_ranking_from_cache_is_exact_and_sekd_full_k():
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 4, 15), 3 * torch.randn(3, 4, 15)
    target = torch.randint(2, 15, (3, 4))
    ids, values, tail = losses.topk_with_tail(losses.log_probs(teacher), 8)
    _, rank = losses.tie_kd_terms(student, losses.DenseTeacher.from_logits(teacher), target, 1, topk=5)
    _, cached_rank = losses.tie_kd_terms(student, losses.TopKTeacher(ids, values, tail), target, 1, topk=5)
    assert cached_rank.item() == pytest.approx(rank.item(), rel=1e-6)
    all_ids, all_values, all_tail = losses.topk_with_tail(losses.log_probs(teacher), 15)
    kl, _ = losses.tie_kd_terms(student, losses.DenseTeacher.from_logits(teacher), target, 1, topk=5, log_epsilon=0.0)
    cached_kl, _ = losses.tie_kd_terms(student, losses.TopKTeacher(all_ids, all_values, all_tail), target, 1, topk=5, log_epsilon=0.0)
    assert cached_kl.item() == pytest.approx(kl.item(), rel=1e-5)
    full = losses.self_evolution_kd_loss(student, losses.DenseTeacher.from_logits(teacher), target, 1, 0.1, 0.5, gt_weight=0.3)
    cached = losses.self_evolution_kd_loss(student, losses.TopKTeacher(all_ids, all_values, all_tail), target, 1, 0.1, 0.5, gt_weight=0.3)
    assert cached[0].item() == pytest.approx(full[0].item(), rel=1e-5)
    assert cached[2].n_hard.item() == full[2].n_hard.item()


# -- the criterions' cached branch, on toy batches ------------------------------------


def cached_sample(task, teacher, k, seed=0):
    sample = toy.make_sample(task, batch_size=4, seed=seed)
    ids, values, tail = teacher_topk(teacher, sample["net_input"], k, 1.0)
    sample[IDS_KEY], sample[LPROBS_KEY], sample[TAIL_KEY] = ids, values.half(), tail
    return sample


def criterions(task):
    base = dict(sentence_avg=False, label_smoothing=0.1, kd_alpha=0.5, kd_temperature=1.0)
    return {
        "word_kd": WordKDCriterion(task, WordKDConfig(**base)),
        "selective_kd": SelectiveKDCriterion(task, SelectiveKDConfig(**base)),
        "self_evolution_kd": SelfEvolutionKDCriterion(task, SelfEvolutionKDConfig(**base)),
        "tie_kd": TieKDCriterion(task, TieKDConfig(**base, tie_iterations=1, tie_exact_kl=True)),
        "hybrid_gated_kd": HybridGatedKDCriterion(task, HybridGatedKDConfig(
            **dict(base, kd_alpha=0.7), gate="fixed", gate_fixed_value=1.0)),
    }


@pytest.mark.parametrize("name", ["word_kd", "selective_kd", "self_evolution_kd", "tie_kd", "hybrid_gated_kd"])
def test_cached_criterion_matches_live_teacher_at_full_k(name):
    task = toy.make_task()
    teacher = toy.make_teacher(task, seeds=(7,))
    vocab = len(task.target_dictionary)
    sample = cached_sample(task, teacher, vocab)
    criterion = criterions(task)[name]
    assert criterion.teacher_cache_error({"k": vocab}) is None
    live_model, cached_model = toy.make_model(task, seed=0), toy.make_model(task, seed=0)
    live, _, live_log = criterion(live_model, sample, teacher=teacher)
    cached, _, cached_log = criterion(cached_model, sample, teacher=CachedTeacher.from_batch(sample))
    # fp16 storage of the teacher's log-probabilities: agreement to about 1e-3 relative
    assert cached.item() == pytest.approx(live.item(), rel=2e-3)
    assert int(cached_log["kd_agree"]) == int(live_log["kd_agree"])
    live.backward()
    cached.backward()
    for a, b in zip(live_model.parameters(), cached_model.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=2e-2, atol=2e-4)


def test_cached_criterion_with_small_k_trains():
    task = toy.make_task()
    teacher = toy.make_teacher(task, seeds=(7,))
    sample = cached_sample(task, teacher, 4)
    model = toy.make_model(task, seed=0)
    loss, _, log = criterions(task)["word_kd"](model, sample, teacher=CachedTeacher.from_batch(sample))
    loss.backward()
    assert torch.isfinite(loss) and log["kd_loss"].item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_criterions_that_need_the_live_teacher_refuse_the_cache():
    task = toy.make_task()
    base = dict(sentence_avg=False, label_smoothing=0.1, kd_alpha=0.5, kd_temperature=1.0)
    tie = TieKDCriterion(task, TieKDConfig(**base, tie_iterations=3))
    assert "student's own prefixes" in tie.teacher_cache_error({"k": 8})
    assert "exceeds the cache's k" in TieKDCriterion(task, TieKDConfig(**base, tie_iterations=1, tie_topk=9)).teacher_cache_error({"k": 8})
    hybrid = HybridGatedKDCriterion(task, HybridGatedKDConfig(**base))  # greedy-online sentence targets
    assert "greedy" in hybrid.teacher_cache_error({"k": 8})
    with pytest.raises(DistillationError, match="exclusive"):
        toy.make_task(teacher_path="t.pt", teacher_cache="cache")


# -- building and reading a cache of real data ------------------------------------------


def build(prepared, teacher, out_dir, *extra, check=True):
    return cli.run("fairseq_kd.cache", ["build", "--data", prepared.bin, "--path", teacher, "--out-dir", out_dir,
                                        "--cpu", "--no-progress-bar", *extra], check=check)


@pytest.fixture(scope="module")
def cache8(prepared, teacher_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "k8")
    build(prepared, teacher_ckpt, out, "--k", "8", "--num-shards", "3", "--max-tokens", "300")  # the batching of the resume test
    return out


def test_round_trip_equals_the_teacher(prepared, teacher_ckpt, cache8):
    from fairseq_kd.decoding.fairseq_backend import build_task
    from fairseq_kd.teacher import load_teacher

    manifest = read_manifest(cache8)
    assert (manifest["k"], manifest["ids_dtype"], manifest["values_dtype"], manifest["num_shards"]) == (8, "uint16", "float16", 3)
    cache = TeacherCache(cache8)
    task = build_task(prepared.bin, prepared.src, prepared.tgt)
    task.cfg.dataset_impl, task.cfg.required_seq_len_multiple = None, 1
    task.load_dataset("train")
    dataset = task.dataset("train")
    assert len(cache) == len(dataset) == manifest["num_examples"]
    assert int(cache.sizes.sum()) == manifest["num_target_tokens"] == int(dataset.tgt_sizes.sum())
    teacher = load_teacher([teacher_ckpt], task)
    # examples at both ends of every shard
    examples = [0, 1, 499, 500, 999, 1000, len(dataset) - 1]
    batch = dataset.collater([dataset[i] for i in examples])
    ids, values, tails = teacher_topk(teacher, batch["net_input"], 8, 1.0)
    for b, example in enumerate(batch["id"].tolist()):
        cached_ids, cached_values, cached_tail = cache[example]
        n = dataset.tgt_sizes[example]
        assert cached_ids.shape == (n, 8) and cached_values.dtype == torch.float16
        # the teacher's values to fp16 rounding (half an ulp, plus float32 noise of another batch's padding)
        assert torch.allclose(cached_values.float(), values[b, :n], rtol=2.0**-10, atol=1e-5)
        distinct = values[b, :n, 1:] - values[b, :n, :-1] < -1e-6  # ids are only defined up to exact ties
        assert torch.equal(cached_ids[:, 0], ids[b, :n, 0])
        assert torch.equal(cached_ids[:, 1:][distinct], ids[b, :n, 1:][distinct])
        # the tail's log-mass is stored in float32, computed from the full distribution at build time
        assert cached_tail.dtype == torch.float32 and cached_tail.shape == (n,)
        assert torch.allclose(cached_tail, tails[b, :n], rtol=1e-4, atol=1e-5)
    info = json.loads(cli.run("fairseq_kd.cache", ["info", cache8]).stdout)
    assert info["size"]["data_bytes_per_target_token"] == 36.0  # k = 8: 8 uint16 ids + 8 fp16 values + fp32 tail
    assert info["size"]["index_bytes_per_example"] < 37  # three .idx files: int32 size + int64 pointer each


def test_resume_after_a_killed_build(prepared, teacher_ckpt, cache8, tmp_path):
    out = str(tmp_path / "resumed")
    cmd = [sys.executable, "-m", "fairseq_kd.cache", "build", "--data", prepared.bin, "--path", teacher_ckpt,
           "--out-dir", out, "--cpu", "--k", "8", "--num-shards", "3", "--no-progress-bar", "--max-tokens", "300"]
    proc = subprocess.Popen(cmd, cwd=cli.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    first = os.path.join(out, "shard000-of-003")
    deadline = time.time() + 240
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(first), "the build did not finish its first shard"
    # whatever the kill interrupted is under a temporary name; every final-named shard is complete
    for name in os.listdir(out):
        assert name == "manifest.json" or re.fullmatch(r"shard00\d-of-003(\.tmp)?", name), name
    finished = sorted(n for n in os.listdir(out) if n.startswith("shard") and not n.endswith(".tmp"))
    inode = os.stat(os.path.join(first, "ids.bin")).st_ino
    # a stale partial shard from an earlier kill is redone, not trusted
    os.makedirs(os.path.join(out, "shard002-of-003.tmp"), exist_ok=True)
    open(os.path.join(out, "shard002-of-003.tmp", "ids.bin"), "wb").write(b"partial")
    proc = build(prepared, teacher_ckpt, out, "--k", "8", "--num-shards", "3", "--max-tokens", "300")
    skipped = re.findall(r"shard (\d) of 3 is complete: skipped", proc.stderr)
    assert sorted(int(s) for s in skipped) == [int(n[5:8]) for n in finished]
    assert os.stat(os.path.join(first, "ids.bin")).st_ino == inode  # the finished shard was not rewritten
    assert sorted(os.listdir(out)) == ["manifest.json", "shard000-of-003", "shard001-of-003", "shard002-of-003"]
    for shard in ("shard000-of-003", "shard001-of-003", "shard002-of-003"):
        for name in ("ids.bin", "ids.idx", "lprobs.bin", "lprobs.idx"):
            with open(os.path.join(out, shard, name), "rb") as a, open(os.path.join(cache8, shard, name), "rb") as b:
                assert a.read() == b.read(), (shard, name)
    again = build(prepared, teacher_ckpt, out, "--k", "8", "--num-shards", "3", "--max-tokens", "300")
    assert len(re.findall(r"is complete: skipped", again.stderr)) == 3 and "loaded teacher" not in again.stderr


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_build_refuses_another_teacher_or_k(prepared, teacher_ckpt, cache8, tmp_path):
    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()  # the classes fairseq checkpoints hold, allow-listed
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] + 0.01
    other = str(tmp_path / "other_teacher.pt")
    torch.save(state, other)
    manifest = os.path.join(cache8, "manifest.json")
    _one_line_error(build(prepared, other, cache8, "--k", "8", "--num-shards", "3", "--max-tokens", "300", check=False),
                    manifest, "teacher checkpoint")
    from fairseq_kd.cache.build import build_cache

    with pytest.raises(DistillationError, match=re.escape(manifest) + ".*k is 8 in the cache, 4 here"):
        build_cache(prepared.bin, "train", teacher_ckpt, cache8, k=4, num_shards=3)
    with pytest.raises(DistillationError, match="num_shards is 3 in the cache, 2 here"):
        build_cache(prepared.bin, "train", teacher_ckpt, cache8, k=8, num_shards=2)
    with pytest.raises(DistillationError, match="temperature is 1.0 in the cache, 2.0 here"):
        build_cache(prepared.bin, "train", teacher_ckpt, cache8, k=8, num_shards=3, temperature=2.0)


def _task_check(data, cache, criterion_cls=WordKDCriterion, config_cls=WordKDConfig, **criterion_cfg):
    from fairseq_kd.tasks.distillation_translation import DistillationTranslationConfig, DistillationTranslationTask

    cfg = DistillationTranslationConfig(data=data, source_lang="en", target_lang="de", teacher_cache=cache,
                                        train_subset="train")
    task = DistillationTranslationTask.setup_task(cfg)
    criterion = criterion_cls(task, config_cls(sentence_avg=False, **criterion_cfg))
    return task.load_teacher_cache(criterion, criterion_cls.__name__)


def test_training_refuses_another_dictionary_split_or_temperature(prepared, teacher_ckpt, cache8, tmp_path):
    manifest = os.path.join(cache8, "manifest.json")
    assert _task_check(prepared.bin, cache8)["k"] == 8
    data = str(tmp_path / "data")
    shutil.copytree(prepared.bin, data)
    for lang in (prepared.src, prepared.tgt):  # same symbols (the model still builds), other counts: other files
        path = os.path.join(data, f"dict.{lang}.txt")
        lines = open(path, encoding="utf-8").read().splitlines()
        word, count = lines[0].split(" ", 1)
        lines[0] = f"{word} {int(count.split()[0]) + 1}"
        open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    with pytest.raises(DistillationError, match=re.escape(manifest) + ".*dictionaries differ"):
        _task_check(data, cache8)
    valid_cache = str(tmp_path / "valid_cache")
    build(prepared, teacher_ckpt, valid_cache, "--split", "valid")
    with pytest.raises(DistillationError, match="split is 'valid' in the cache, 'train' here"):
        _task_check(prepared.bin, valid_cache)
    with pytest.raises(DistillationError, match="--tie-iterations 1"):
        _task_check(prepared.bin, cache8, TieKDCriterion, TieKDConfig)
    # through fairseq-train: one line on stderr, no traceback
    proc = cli.train(prepared.bin, str(tmp_path / "c"), *KD, "--teacher-cache", cache8, "--criterion", "word_kd",
                     "--kd-temperature", "2", "--max-update", "2", check=False)
    _one_line_error(proc, manifest, "temperature is 1.0 in the cache, 2.0 here")


def test_two_rank_data_parallel_training_from_the_cache(prepared, cache8, tmp_path):
    save_dir = str(tmp_path / "ddp")
    port = cli.free_port()
    procs = []
    for rank in range(2):
        cmd = [
            sys.executable, "-m", "fairseq_cli.train", prepared.bin, "--save-dir", save_dir,
            *cli.TINY_ARCH, *cli.TINY_OPTIM, *KD, "--teacher-cache", cache8,
            "--criterion", "word_kd", "--max-update", "4", "--num-workers", "1",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--distributed-world-size", "2", "--distributed-rank", str(rank),
            "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cli.REPO,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "loaded teacher" not in out  # no live teacher on any rank
    assert "teacher: cache" in outputs[0]  # (fairseq logs on rank 0 only)
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert "kd_loss" in outputs[0] and "kd_top1_agree" in outputs[0]


def _last_valid_loss(stdout: str) -> float:
    losses_ = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", stdout)
    assert losses_, stdout[-3000:]
    return float(losses_[-1])


def test_student_from_the_cache_matches_the_live_teacher_student(prepared, teacher_ckpt, cache8, tmp_path):
    common = [*KD, "--criterion", "word_kd", "--kd-alpha", "0.5", "--max-update", "40"]
    live = cli.train(prepared.bin, str(tmp_path / "live"), *common, "--teacher-path", teacher_ckpt)
    cached = cli.train(prepared.bin, str(tmp_path / "cached"), *common, "--teacher-cache", cache8)
    live_loss, cached_loss = _last_valid_loss(live.stdout + live.stderr), _last_valid_loss(cached.stdout + cached.stderr)
    assert abs(cached_loss - live_loss) <= 0.02 * live_loss, (live_loss, cached_loss)
    assert "teacher: cache" in cached.stdout + cached.stderr
