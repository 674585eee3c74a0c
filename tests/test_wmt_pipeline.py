"""fairseq's exact WMT pipeline: filtering order, test-set rules, compound-split BLEU, Romanian rules."""

import math
import shutil
import subprocess

import pytest

from fairseq_kd import scoring_tok
from fairseq_kd.errors import DistillationError
from fairseq_kd.wmt import rules

# a fairseq-generate output (Moses + BPE data, --remove-bpe): sentences out of order, S/T/H/D/P lines, the
# closing BLEU line compound_split_bleu.sh checks for
GENERATE_OUTPUT = """\
S-1\tThat is well @-@ meant .
T-1\tDas ist gut @-@ gemeint , oder ?
H-1\t-0.31\tDas ist gut @-@ gemeint .
D-1\t-0.31\tDas ist gut @-@ gemeint .
P-1\t-0.1 -0.2 -0.3 -0.4 -0.5 -0.6 -0.7
S-0\tA test .
T-0\tEin Test .
H-0\t-0.12\tEin Test .
D-0\t-0.12\tEin Test .
P-0\t-0.1 -0.1 -0.1 -0.1
S-2\tHe came <unk> .
T-2\tEr kam <unk> .
H-2\t-0.5\tEr kam <unk> .
D-2\t-0.5\tEr kam <unk> .
P-2\t-0.1 -0.1 -0.1 -0.1 -0.1
Generate test with beam=5: BLEU4 = 40.00, 80.0/50.0/30.0/20.0 (BP=1.000, ratio=1.000, syslen=15, reflen=17)
"""

# the script's rules by hand: H-1 becomes "Das ist gut @ ##AT##-##AT## @ gemeint ." (8 tokens), T-1 the same
# without its "." and with ", oder ?" (10); a <unk> of the reference never matches.  n-gram matches / totals:
# 1: 7+3+3 / 8+3+4   2: 6+2+1 / 7+2+3   3: 5+1+0 / 6+1+2   4: 4+0+0 / 5+0+1; syslen 15, reflen 17
EXPECTED = math.exp(1 - 17 / 15) * (13 / 15 * 9 / 12 * 6 / 9 * 4 / 6) ** 0.25 * 100


def test_compound_split_bleu_reproduces_the_fairseq_script(tmp_path):
    gen = tmp_path / "gen.out"
    gen.write_text(GENERATE_OUTPUT, encoding="utf-8")
    hyps, refs = scoring_tok.generate_output_sides(str(gen))
    assert [scoring_tok.split_compounds(h) for h in hyps][0] == "Das ist gut @ ##AT##-##AT## @ gemeint ."
    bleu, line = scoring_tok.compound_split_bleu(str(gen))
    assert bleu == pytest.approx(EXPECTED, abs=1e-9)
    assert line.startswith(f"BLEU4 = {EXPECTED:2.2f}, 86.7/75.0/66.7/66.7 (BP=")
    assert line.endswith("syslen=15, reflen=17)")
    if shutil.which("perl") and shutil.which("bash"):  # the script's own commands give the same two sides
        cmd = (r"grep ^H gen.out | awk -F '\t' '{print $NF}' | perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'; "
               r"echo ===; grep ^T gen.out | cut -f2- | perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'")
        out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        sys_side, ref_side = out.split("===\n")
        assert sys_side.splitlines() == [scoring_tok.split_compounds(h) for h in hyps]
        assert ref_side.splitlines() == [scoring_tok.split_compounds(r) for r in refs]
    # fairseq-score's own scorer (libbleu) on the split sides
    from fairseq.data import dictionary
    from fairseq.scoring import bleu as fbleu

    d = dictionary.Dictionary()
    scorer = fbleu.Scorer(fbleu.BleuConfig(pad=d.pad(), eos=d.eos(), unk=d.unk()))
    for h, r in zip(hyps, refs):
        scorer.add(d.encode_line(scoring_tok.split_compounds(r)), d.encode_line(scoring_tok.split_compounds(h)))
    assert scorer.score() == pytest.approx(bleu, abs=1e-9)
    assert scorer.result_string() == line


def test_compound_split_bleu_refuses_an_unfinished_generate_output(tmp_path):
    gen = tmp_path / "gen.out"
    gen.write_text(GENERATE_OUTPUT.rsplit("Generate", 1)[0], encoding="utf-8")
    with pytest.raises(DistillationError, match="has not finished"):
        scoring_tok.compound_split_bleu(str(gen))


def test_compound_split_rule_is_perl_s_g_on_bytes():
    assert scoring_tok.split_compounds("gut @-@ gemeint") == "gut @ ##AT##-##AT## @ gemeint"
    assert scoring_tok.split_compounds("a-b-c x-y - z") == "a ##AT##-##AT## b-c x ##AT##-##AT## y - z"
    # perl reads bytes: a no-break space is not \s there
    assert scoring_tok.split_compounds("a\u00a0-b") == "a\u00a0 ##AT##-##AT## b"


def test_compound_split_of_plain_text_uses_fairseq_test_tokenization():
    hyp, ref = ["Das ist gut-gemeint."], ["Das ist gut-gemeint, oder?"]
    assert scoring_tok.fairseq_test_tokenize(hyp, "de") == ["Das ist gut @-@ gemeint ."]
    expected = scoring_tok.fairseq_bleu(["Das ist gut @ ##AT##-##AT## @ gemeint ."],
                                        ["Das ist gut @ ##AT##-##AT## @ gemeint , oder ?"])[0]
    assert scoring_tok.tokenized_bleu(hyp, ref, "de", compound_split=True) == pytest.approx(expected)
    assert expected == pytest.approx(math.exp(1 - 10 / 8) * (7 / 8 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25 * 100)


def test_romanian_rules_of_the_wmt16_scripts():
    cedilla, comma = "\u015e\u015f\u0162\u0163", "\u0218\u0219\u021a\u021b"
    assert rules.normalise_romanian(cedilla + " abc") == comma + " abc"
    assert rules.remove_romanian_diacritics(comma + "\u0102\u0103\u00c2\u00e2\u00ce\u00ee") == "SsTtAaAaIi"
    line = "\u015ei \u021b\u0103ranii \u00eei \u00eent\u00e2mpin\u0103 pe \u0219ef"  # cedilla S, comma t
    assert rules.remove_romanian_diacritics(rules.normalise_romanian(line)) == "Si taranii ii intampina pe sef"
    # cedillas are left alone by remove-diacritics.py (it assumes normalise-romanian.py ran first)
    assert rules.remove_romanian_diacritics("\u015f") == "\u015f"
    from fairseq_kd.prepare_bpe import moses_tokenize

    assert moses_tokenize([line], "ro") == ["Si taranii ii intampina pe sef"]
    assert moses_tokenize(["\u0162ara-mam\u0103"], "ro", test=True) == ["Tara @-@ mama"]
    assert moses_tokenize(["\u0162ara"], "en") == ["\u0162ara"]  # the English side is not touched
    assert moses_tokenize(["\u0162ara"], "ro", romanian=False) == ["\u0162ara"]


def test_clean_corpus_n_semantics():
    pairs = [("a  b\t c", "x y z"), ("a|b", "x"), ("", "x"), ("a b c d", "x y"), ("a " * 251, "x " * 251),
             ("a b", "x" * 1001), ("a b c", "x y")]
    out = list(rules.clean_corpus_n(pairs, 1, 250, 1.5))
    assert out == [("a b c", "x y z"), ("ab", "x"), None, None, None, None, ("a b c", "x y")]
    # factored input (a | in the first pair): bars are kept
    assert list(rules.clean_corpus_n([("a|b c", "x y")], 1, 250, 1.5)) == [("a|b c", "x y")]


def _write_corpus(root, name, splits):
    folder = root / name
    folder.mkdir(parents=True)
    for split, pairs in splits.items():
        (folder / f"{split}.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (folder / f"{split}.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return folder


def test_pairs_are_filtered_once_after_bpe_and_the_test_set_as_fairseq_prepares_it(tmp_path):
    """A pair the raw-word filter drops (1 word : 2 words) is kept after tokenization; a pair the raw filter
    keeps (2 : 2 words) is dropped once BPE splits its rare words; the test set is only quote-mapped and
    tokenized with -a, and kept whole; valid is filtered like train."""
    from fairseq_kd.prepare_bpe import prepare_bpe
    from fairseq_kd.wmt.clean import keep_pair as raw_keep

    common = [("the house is small", "das Haus ist klein"), ("the house is big", "das Haus ist gross")] * 40
    short, rare = ("Hello!", "Hallo Welt"), ("Qwxzvbn Plkjhgfq", "das Haus")
    assert not raw_keep(*short, 250, 1.5) and raw_keep(*rare, 250, 1.5)
    test = [("It\u2019s a well-known «fact»", "Es ist eine wohl-bekannte «Tatsache»"), ("a", "b c d e f g")]
    _write_corpus(tmp_path / "data", "toy_en_de", {"train": common + [short, rare], "valid": [short, rare],
                                                    "test": test})
    out = tmp_path / "out"
    prepare_bpe("toy_en_de", str(tmp_path / "data"), "en", "de", str(out), merges=30, workers=2)
    read = lambda p: p.read_text(encoding="utf-8").splitlines()  # noqa: E731
    raw_train = list(zip(read(out / "raw" / "train.en"), read(out / "raw" / "train.de")))
    assert short in raw_train and rare not in raw_train and len(raw_train) == len(common) + 1
    assert read(out / "raw" / "valid.en") == ["Hello!"]
    bpe_rare = read(out / "bpe" / "train.en")[-1].split()
    assert len(bpe_rare) > 1.5 * len(read(out / "bpe" / "train.de")[-1].split())
    # train: normalize-punctuation turns « » into &quot;; test: only ’ -> ' and tokenizer.perl -a
    assert read(out / "tok" / "test.en") == ["It &apos;s a well @-@ known « fact »", "a"]
    from fairseq_kd.prepare_bpe import moses_tokenize

    assert moses_tokenize([test[0][0]], "en") == ["It &apos;s a well @-@ known &quot; fact &quot;"]  # train chain
    assert read(out / "raw" / "test.de") == [t for _, t in test]  # kept whole, despite the 1 : 6 pair
    assert len(read(out / "bpe_text" / "test.de")) == 2
    assert (out / "bin" / "test.en-de.en.bin").exists()
