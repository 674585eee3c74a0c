"""Teacher decoding as a work queue (``decode --chunk-size``): many small chunks claimed atomically by any
number of worker processes sharing one folder; a dead worker's claim (same host: its pid is gone; any host:
its heartbeat is older than the claim timeout) is taken over; SIGTERM releases the chunk being decoded.
Checked by the merged output: exactly one line per source line, in order, none lost or repeated."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fairseq_kd import decoding
from fairseq_kd.decoding.shards import ShardBusy, num_chunks, partial_shards, shard_lock
from tests import cli, toy

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=cli.REPO)
SOURCES = [f"w{i % 20} w{(i * 7) % 20} w{(i * 3) % 20}" for i in range(60)]

WORKER = """
import sys, time
sys.path.insert(0, {repo!r})
from fairseq_kd import decoding
from fairseq_kd.decoding.cli import Terminated, _terminate
import signal
from tests import toy
signal.signal(signal.SIGTERM, _terminate)
d = toy.make_dictionary()
c = decoding.corpus_from_text({src!r}, None, d, d)
def slow(sample, **_):
    time.sleep({delay})
    return [[("echo " + str(int(i)), -1.0)] for i in sample["id"]]
try:
    done = decoding.decode_queue(c, slow, {out!r}, {chunks}, max_sentences=2, progress=False, wait={wait},
                                 poll=0.2, claim_timeout={timeout}, worker={worker!r})
except Terminated:
    sys.exit(143)
print("decoded", *done)
"""


def corpus(tmp_path):
    d = toy.make_dictionary()
    src = tmp_path / "train.bpe.src"
    src.write_text("".join(s + "\n" for s in SOURCES))
    return decoding.corpus_from_text(str(src), None, d, d)


def worker(tmp_path, out, chunks, name, delay=0.05, wait=False, timeout=600.0):
    script = WORKER.format(repo=cli.REPO, src=str(tmp_path / "train.bpe.src"), out=out, chunks=chunks,
                           delay=delay, wait=wait, timeout=timeout, worker=name)
    return subprocess.Popen([sys.executable, "-c", script], env=ENV, cwd=cli.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def echo(sample, **_):
    return [[("echo " + str(int(i)), -1.0)] for i in sample["id"]]


def merged(tmp_path, out):
    decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    return (tmp_path / "t.txt").read_text().splitlines()


def claims(out):
    return [f for f in os.listdir(out) if f.endswith(".lock")]


def test_chunks_of_a_chunk_size():
    assert num_chunks(60, 8) == 8 and num_chunks(64, 8) == 8 and num_chunks(0, 8) == 1 and num_chunks(1, 100) == 1
    with pytest.raises(decoding.DistillationError, match="--chunk-size must be >= 1"):
        num_chunks(10, 0)


def test_workers_share_the_chunks_and_a_killed_one_is_replaced(tmp_path):
    """Two workers, 12 chunks; one is killed mid-chunk and started again: every line exactly once."""
    corpus(tmp_path)
    out = str(tmp_path / "dec")
    a = worker(tmp_path, out, 12, "a", wait=True)
    b = worker(tmp_path, out, 12, "b")
    try:
        deadline = time.time() + 120
        while True:  # b holds a chunk with a partial file: kill it mid-chunk
            held = [f for f in claims(out) if json.load(open(os.path.join(out, f))).get("worker") == "b"] \
                if os.path.isdir(out) else []
            if held and partial_shards(os.path.join(out, held[0][:-len(".lock")])):
                break
            assert b.poll() is None and time.time() < deadline, "worker b ended before it could be killed"
            time.sleep(0.02)
        os.kill(b.pid, signal.SIGKILL)
        b.wait()
        b = worker(tmp_path, out, 12, "b")  # restarted: the dead claim (same host, pid gone) is taken over
        out_a, err_a = a.communicate(timeout=300)
        out_b, err_b = b.communicate(timeout=300)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert a.returncode == 0 and b.returncode == 0, err_a[-2000:] + err_b[-2000:]
    by_a, by_b = out_a.split()[1:], out_b.split()[1:]
    assert by_a and set(by_a).isdisjoint(by_b)  # both decoded, never the same chunk twice
    assert merged(tmp_path, out) == [f"echo {i}" for i in range(len(SOURCES))]
    assert not claims(out) and not [f for f in os.listdir(out) if ".tmp" in f]


def test_a_claim_of_another_host_is_taken_over_only_after_its_heartbeat_stops(tmp_path):
    c = corpus(tmp_path)
    out = str(tmp_path / "dec")
    os.makedirs(out)
    lock = decoding.shard_path(out, 1, 3) + ".lock"
    with open(lock, "w") as f:
        json.dump({"host": "node-elsewhere", "pid": 1, "worker": "7"}, f)
    # fresh heartbeat: left to its holder (not waiting: the others are done, it is not)
    assert decoding.decode_queue(c, echo, out, 3, progress=False, claim_timeout=60) == [0, 2]
    with pytest.raises(ShardBusy, match="node-elsewhere"):
        decoding.decode_shard(c, echo, out, 1, 3, progress=False, claim_timeout=60)
    old = time.time() - 120
    os.utime(lock, (old, old))  # that node stopped renewing it two minutes ago
    assert decoding.decode_queue(c, echo, out, 3, progress=False, claim_timeout=60, wait=True) == [1]
    assert merged(tmp_path, out) == [f"echo {i}" for i in range(len(SOURCES))]


def test_a_held_claim_renews_its_heartbeat(tmp_path):
    final = str(tmp_path / "shard000-of-001.jsonl")
    with shard_lock(final, claim_timeout=0.4, worker="w"):
        first = os.stat(final + ".lock").st_mtime
        holder = json.load(open(final + ".lock"))
        time.sleep(0.5)
        assert os.stat(final + ".lock").st_mtime > first
    assert holder == {"host": socket.gethostname(), "pid": os.getpid(), "worker": "w"}
    assert not os.path.exists(final + ".lock")


def test_sigterm_releases_the_chunk_being_decoded(tmp_path):
    corpus(tmp_path)
    out = str(tmp_path / "dec")
    p = worker(tmp_path, out, 4, "t", delay=0.3)
    try:
        deadline = time.time() + 120
        while not (os.path.isdir(out) and claims(out)):
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.02)
        time.sleep(0.4)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143
    assert not claims(out)  # released
    complete = {s for s in range(4) if os.path.exists(decoding.shard_path(out, s, 4))}
    assert len(complete) < 4
    c = corpus(tmp_path)
    # a requeued job goes on with the chunks left, the interrupted one first (nothing waits for a claim)
    assert decoding.decode_queue(c, echo, out, 4, progress=False) == sorted(set(range(4)) - complete)
    assert merged(tmp_path, out) == [f"echo {i}" for i in range(len(SOURCES))]
