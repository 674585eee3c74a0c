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


def test_chunk_word_counts_equal_get_vocabulary_on_awkward_spacing():
    """The one-pass count (lines joined by spaces) equals subword-nmt's per-line get_vocabulary, in values
    and first-seen order, with runs of spaces, leading and trailing blanks, tabs and empty lines."""
    from subword_nmt.learn_bpe import get_vocabulary

    from fairseq_kd.prepare_bpe import word_count_chunks

    lines = ["  a b  c ", " ", "", "a\tb c", "x \ty", "c   a", "\td e\t", "a"]
    ref = get_vocabulary(line + "\n" for line in lines)
    got = word_count_chunks()(lines)
    assert got == Counter(ref) and list(got) == list(ref)


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


def test_worker_chunks_decode_as_read_text_lines(tmp_path):
    """The workers decode raw chunks exactly as read_text_lines reads the file (BOM, CRLF, a lone CR inside a
    line, a last line without newline), whatever the chunk boundaries."""
    from fairseq_kd.textio import read_text_lines

    src = tmp_path / "in.txt"
    src.write_bytes("\ufeffa b\r\nc\rd\n\n  e  \r\r\nf".encode("utf-8"))
    expected = list(read_text_lines(str(src)))
    assert expected == ["a b", "c\rd", "", "  e  ", "f"]
    for size in (1, 2, 3, 10):
        got = [line for blob, first in streaming.raw_chunks(str(src), size)
               for line in streaming.decode_lines(blob, first, str(src))]
        assert got == expected
    dest = tmp_path / "out.txt"
    assert streaming.map_file(upper_chunks, (), str(src), str(dest), workers=2, chunk_lines=2) == 5
    assert dest.read_bytes() == "A B\nC\rD\n\n  E  \nF\n".encode("utf-8")


def test_invalid_utf8_in_a_worker_chunk_names_the_file_and_line(tmp_path):
    from fairseq_kd.errors import DistillationError

    src, dest = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"".join(b"line %d\n" % i for i in range(25)) + b"caf\xe9\n")
    with pytest.raises(DistillationError, match=r"in\.txt:26: not valid UTF-8 \(byte b'\\xe9' at column 4\)"):
        streaming.map_file(upper_chunks, (), str(src), str(dest), workers=2, chunk_lines=4)
    assert not dest.exists()


def test_filter_pairs_in_two_workers_equals_one(tmp_path):
    """clean-corpus-n in chunks over 2 workers writes the bytes of the serial run (and keeps the first pair's
    factored-input decision for every chunk)."""
    from fairseq_kd.prepare_bpe import filter_pairs

    pairs = [(f"w{i} " * (1 + i % 7), f"v{i} " * (1 + (i * 3) % 11)) for i in range(997)]
    pairs[5] = ("a | b", "c d")  # not the first pair: '|' is deleted (the script's non-factored input)
    pairs[9] = ("", "x")
    bpe = (tmp_path / "bpe.en", tmp_path / "bpe.de")
    raw = (tmp_path / "raw.en", tmp_path / "raw.de")
    for side in (0, 1):
        bpe[side].write_text("".join(p[side] + "\n" for p in pairs))
        raw[side].write_text("".join(f"raw {i} {side}\n" for i in range(len(pairs))))
    results = {}
    for workers in (1, 2):
        outs = [tmp_path / f"{name}{workers}" for name in ("ce", "cd", "re", "rd")]
        counts = filter_pairs(tuple(map(str, bpe)), tuple(map(str, raw)), tuple(map(str, outs[:2])),
                              tuple(map(str, outs[2:])), workers=workers)
        results[workers] = counts, [o.read_bytes() for o in outs]
    assert results[1] == results[2]
    (read, kept), (ce, cd, re_, rd) = results[1]
    assert read == 997 and 0 < kept < 997
    assert b"a b\n" in ce and b"raw 9 0\n" not in re_
    assert len(ce.splitlines()) == len(rd.splitlines()) == kept
