"""The benchmark's JSON summary, the targets of docs/performance.md and the printed table."""

from bench.common import CACHE_K


def summary_json(per_vocab, decode):
    """``{"vocab": {"8000": {"step_time_ratio": {NAME: r}, "peak_memory_ratio": {NAME: r},
    "teacher_forward_share": r}, "32000": {...}}, "decode": {"ct2_float32": {"speedup": r, "bleu_delta": d},
    "ct2_int8": {...}}}`` plus, under ``"details"``, the achieved vocabulary sizes, absolute times,
    passes, floors, decoding speeds and BLEU, and the skipped rows with their reasons."""
    out = {"vocab": {}, "decode": {}, "details": {"vocab": {}, "decode": decode}}
    for nominal, r in per_vocab.items():
        out["vocab"][str(nominal)] = {
            "step_time_ratio": r["step_time_ratio"],
            "peak_memory_ratio": r["peak_memory_ratio"],
            "teacher_forward_share": r["teacher_forward_share"],
        }
        out["details"]["vocab"][str(nominal)] = {k: v for k, v in r.items() if k not in out["vocab"][str(nominal)]}
    base = decode["fairseq_generate"]
    for name in ("ct2_float32", "ct2_int8"):
        out["decode"][name] = {
            "speedup": decode[name]["sentences_per_second"] / base["sentences_per_second"],
            "bleu_delta": decode[name]["bleu"] - base["bleu"],
        }
    return out


def targets(per_vocab, decode_summary):
    """(description, value, limit[, True]) of every target of docs/performance.md; a target holds when
    value <= limit (value >= limit for the rows marked True)."""
    rows = []
    for nominal, r in per_vocab.items():
        st, mem, share = r["step_time_ratio"], r["peak_memory_ratio"], r["teacher_forward_share"]
        if "word_kd_cached" in st:
            rows.append((f"V={nominal} word_kd_cached step time", st["word_kd_cached"], 1.10))
            rows.append((f"V={nominal} word_kd_cached peak memory", mem["word_kd_cached"], 1.15))
        rows.append((f"V={nominal} word_kd step time (1 + teacher share + 0.10)", st["word_kd"], 1.0 + share + 0.10))
        floors = r["floors"]
        rows.append((f"V={nominal} tie_kd step time (floor + 0.15)", st["tie_kd"], floors["tie_kd"] + 0.15))
        rows.append((f"V={nominal} hybrid_gated_kd step time (floor + 0.25)", st["hybrid_gated_kd"],
                     floors["hybrid_gated_kd"] + 0.25))
        if "on_policy_kd" in st:
            rows.append((f"V={nominal} on_policy_kd step time (floor + 0.25)", st["on_policy_kd"],
                         floors["on_policy_kd"] + 0.25))
        if nominal == 32000:
            for name, m in mem.items():
                rows.append((f"V={nominal} {name} peak memory", m, 1.3))
        if r.get("cache_bytes_per_token") is not None:
            rows.append((f"V={nominal} cache bytes per target token (k={CACHE_K})", r["cache_bytes_per_token"], 32.0))
    for name, (speed, bleu_limit) in {"ct2_float32": (2.0, 0.3), "ct2_int8": (1.5, 0.8)}.items():
        d = decode_summary[name]
        rows.append((f"{name} speedup over fairseq-generate", d["speedup"], speed, True))
        rows.append((f"{name} |BLEU delta|", abs(d["bleu_delta"]), bleu_limit))
    return rows


def print_report(per_vocab, decode, summary, skipped):
    names = []
    for r in per_vocab.values():
        names += [n for n in r["step_time_ratio"] if n not in names]
    vocabs = list(per_vocab)
    header = "| criterion | " + " | ".join(f"step V={v} | memory V={v}" for v in vocabs) + " |"
    print()
    print(header)
    print("|---|" + "---:|---:|" * len(vocabs))
    for n in names:
        cells = []
        for v in vocabs:
            st, mem = per_vocab[v]["step_time_ratio"].get(n), per_vocab[v]["peak_memory_ratio"].get(n)
            cells += [f"{st:.2f}" if st is not None else "-", f"{mem:.2f}" if mem is not None else "-"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    cells = []
    for v in vocabs:
        cells += [f"{per_vocab[v]['teacher_forward_share']:.2f}", "-"]
    print("| teacher forward alone | " + " | ".join(cells) + " |")
    print()
    for v in vocabs:
        r = per_vocab[v]
        print(f"V={v}: dictionary {r['vocab']} symbols ({r['sentencepiece_pieces']} SentencePiece pieces, "
              f"{r['padding_symbols']} unused padding symbols); plain step {r['plain_step_seconds'] * 1000:.0f} ms CPU, "
              f"peak {r['plain_peak_bytes'] / 2**20:.0f} MiB above construction")
        p, f = r["passes"], r["floors"]
        print(f"  passes (ms CPU): student fwd+bwd {p['student'] * 1000:.0f}, optimizer {p['optimizer'] * 1000:.0f}, "
              f"teacher forward {p['teacher'] * 1000:.0f}, teacher greedy {p['greedy'] * 1000:.0f}, "
              f"student on greedy targets {p['student_hyp'] * 1000:.0f}, student generation "
              f"{p['student_gen'] * 1000:.0f}, teacher on it {p['teacher_gen'] * 1000:.0f}, student on it "
              f"{p['student_on_gen'] * 1000:.0f}")
        print(f"  floors: tie_kd {f['tie_kd']:.2f} (3 x (student + teacher) + optimizer), hybrid_gated_kd "
              f"{f['hybrid_gated_kd']:.2f} (student + student on greedy targets + teacher + greedy + optimizer), "
              f"on_policy_kd {f['on_policy_kd']:.2f} (student generation + teacher and student on it + optimizer)")
        if r.get("cache_bytes_per_token") is not None:
            print(f"  cache (k = {CACHE_K}): {r['cache_bytes_per_token']:.1f} data bytes per target token "
                  f"(+ {r['cache_index_bytes_per_token']:.1f} index bytes)")
    print()
    print(f"decoding {decode['sentences']} test sentences, beam 5:")
    for name in ("fairseq_generate", "fairseq_backend", "ct2_float32", "ct2_int8"):
        d = decode[name]
        print(f"  {name:17s} {d['sentences_per_second']:7.1f} sentences/s  BLEU {d['bleu']:.2f}")
    for name, d in summary["decode"].items():
        print(f"  {name}: {d['speedup']:.2f}x fairseq-generate, BLEU delta {d['bleu_delta']:+.2f}")
    for reason in skipped:
        print(f"skipped: {reason}")
    print()
    print("targets:")
    for desc, value, limit, *higher in targets(per_vocab, summary["decode"]):
        if higher:
            if value >= limit:
                print(f"  met     {desc}: {value:.2f} >= {limit:.2f}")
            else:
                print(f"  MISSED  {desc}: {value:.2f} < {limit:.2f} (by {limit - value:.2f})")
        elif value <= limit:
            print(f"  met     {desc}: {value:.2f} <= {limit:.2f}")
        else:
            print(f"  MISSED  {desc}: {value:.2f} > {limit:.2f} (by {value - limit:.2f})")


# ---- main ------------------------------------------------------------------------------------------------------------


