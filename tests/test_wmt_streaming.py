"""Streaming preparation: order kept with several workers, bounded read-ahead, finished steps skipped."""

import os
from collections import Counter

import pytest

from fairseq_kd import streaming


def upper_chunks():
    return lambda chunk: [line.upper() for line in chunk]


def failing_chunks(bad):
    def fn(chunk):
        if bad in chunk:
            raise ValueError(f"bad line {bad}")
        return chunk

    return fn


def test_map_file_keeps_the_order_with_two_workers(tmp_path):
    src, dest = tmp_path / "in.txt", tmp_path / "out.txt"
    lines = [f"line {i} {'x' * (i % 13)}" for i in range(5003)]
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    n = streaming.map_file(upper_chunks, (), str(src), str(dest), workers=2, chunk_lines=7)
    assert n == 5003
    assert dest.read_text(encoding="utf-8").splitlines() == [line.upper() for line in lines]
    dest.write_text("kept\n")  # a finished step is not redone
    assert streaming.map_file(upper_chunks, (), str(src), str(dest), workers=2) == 1
    assert dest.read_text() == "kept\n"


def test_ordered_map_reads_ahead_a_bounded_number_of_chunks():
    pulled = []

    def chunks():
        for i in range(1000):
            pulled.append(i)
            yield [str(i)]

    results = streaming.ordered_map(upper_chunks, (), chunks(), workers=2)
    assert next(results) == ["0"]
    assert len(pulled) <= 2 * 2 + 1  # not the whole input (multiprocessing's imap would queue all of it)
    assert [r[0] for r in results] == [str(i) for i in range(1, 1000)]


def test_an_interrupted_step_leaves_no_output(tmp_path):
    src, dest = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("".join(f"{i}\n" for i in range(100)))
    with pytest.raises(ValueError, match="bad line 57"):
        streaming.map_file(failing_chunks, ("57",), str(src), str(dest), workers=2, chunk_lines=10)
    assert os.listdir(tmp_path) == ["in.txt"]  # no partial file under the final or a temporary name


def test_reduce_files_counts_words_like_learn_bpe(tmp_path):
    from fairseq_kd.prepare_bpe import word_count_chunks

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("x y  x\n\nz\n")
    b.write_text(" y x \n")
    counts = streaming.reduce_files(word_count_chunks, (), [str(a), str(b)], lambda c, d: c + d, Counter(),
                                    workers=2, chunk_lines=1)
    assert counts == Counter({"x": 3, "y": 2, "z": 1}) and list(counts) == ["x", "y", "z"]


def test_learned_codes_equal_learn_bpe_on_the_concatenated_text(tmp_path):
    from subword_nmt.learn_bpe import learn_bpe

    from fairseq_kd.prepare_bpe import learn_codes

    text = [f"w{i % 17}ab{i % 5}c the quick brown fox {'jumps' if i % 3 else 'ran'}" for i in range(300)]
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("".join(t + "\n" for t in text[:150]))
    b.write_text("".join(t + "\n" for t in text[150:]))
    learn_codes([str(a), str(b)], 60, str(tmp_path / "codes"), workers=2)
    joined = tmp_path / "joined"
    joined.write_text(a.read_text() + b.read_text())
    with open(joined) as f, open(tmp_path / "ref", "w") as out:
        learn_bpe(f, out, 60)
    assert (tmp_path / "codes").read_text() == (tmp_path / "ref").read_text()
