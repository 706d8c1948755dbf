#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Issue 2's router targets, read from one router_bench JSON (bench/results/router-*.json).

  bench/router_targets.py RESULT.json

Prints each target's count of rows met and the rows that miss it:
  - 2x TE: the issue's seven TransformerEngine rows (bf16 logits, TE-compatible outputs, bitmap), bitep at least twice
    as fast;
  - fused: every forward bitmap row faster than the indices + convert row beside it;
  - bitmap: every bitmap row (forward and backward) no slower than the bytemap row beside it;
  - 75%: forward, bitmap, TE-compatible, T >= 16384, E <= 512, at least 75% of the floor, by the launch time and by the
    batch time. Each row that misses also gets what the line asks of its streaming, where the JSON has an empty
    kernel's times (empty_us, empty_batch_us) and the row's stream times: the line's time less an empty kernel's is
    what is left for the bytes, so the row needs floor / (floor / 0.75 - empty) of the HBM copy's rate; against that,
    the rate the row runs at, floor / (time - empty), and a plain copy of the same bytes', floor / (stream - empty).
    A row whose plain copy misses 75% too is counted apart;
  - recompute: every bf16 backward row faster in recompute mode than in saved mode, per format.
Exit status 0 whatever the counts (a reading, not a gate); 2 on a file without router records.
"""
import json
import sys

# (T, E, k, config): TE's fused router forward on the H100, us (the figures).
TE_US = {
    (16384, 64, 6, "softmax"): 25.8,
    (16384, 128, 8, "softmax"): 34.0,
    (16384, 256, 8, "softmax"): 44.2,
    (16384, 256, 8, "deepseek-v3"): 79.7,
    (16384, 512, 8, "softmax"): 68.3,
    (65536, 256, 8, "softmax"): 148.4,
    (65536, 256, 8, "deepseek-v3"): 285.3,
}


def key(r, *drop):
    return tuple((f, r[f]) for f in ("T", "E", "k", "config", "dtype", "format", "pass", "mode") if f not in drop)


def name(r):
    return "T=%d E=%d %s %s %s %s %s" % (r["T"], r["E"], r["config"], r["dtype"], r["pass"], r["mode"], r["format"])


def report(title, pairs):
    """pairs: (met, description) per row."""
    met = sum(1 for ok, _ in pairs if ok)
    print("%s: %d of %d" % (title, met, len(pairs)))
    for ok, what in pairs:
        if not ok:
            print("  miss: " + what)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    doc = json.load(open(sys.argv[1]))
    recs = doc.get("records", [])
    if not recs:
        print("%s: no router records" % sys.argv[1], file=sys.stderr)
        return 2
    print("# %s: %s, commit %s, %s, HBM %.0f GB/s%s" % (sys.argv[1], doc.get("card"), doc.get("commit"), doc.get("date"),
                                                       doc.get("hbm_GBps", 0.0),
                                                       ", every kernel a dependent launch (--pdl)" if doc.get("pdl") else ""))
    by = {key(r): r for r in recs}

    pairs, speedups = [], []
    for (t, e, k, config), te in sorted(TE_US.items()):
        r = by.get(key({"T": t, "E": e, "k": k, "config": config, "dtype": "bf16", "format": "bitmap", "pass": "fwd",
                        "mode": "te"}))
        if r is None:
            pairs.append((False, "T=%d E=%d %s: no row" % (t, e, config)))
            continue
        x = te / r["median_us"]
        speedups.append(x)
        pairs.append((x >= 2.0, "%s: %.2f us, %.2fx TE's %.1f" % (name(r), r["median_us"], x, te)))
    report("2x TE", pairs)
    if speedups:
        print("  (over TE: %s)" % ", ".join("%.2fx" % x for x in speedups))

    def beside(r, fmt):
        return by.get(tuple((f, fmt if f == "format" else v) for f, v in key(r)))

    pairs = []
    for r in recs:
        if r["pass"] == "fwd" and r["format"] == "bitmap":
            b = beside(r, "indices+convert")
            if b is not None:
                pairs.append((r["median_us"] < b["median_us"],
                              "%s: %.2f us against %.2f" % (name(r), r["median_us"], b["median_us"])))
    report("fused bitmap faster than indices + convert", pairs)

    pairs = []
    for r in recs:
        if r["format"] == "bitmap":
            b = beside(r, "bytemap")
            if b is not None:
                pairs.append((r["median_us"] <= b["median_us"],
                              "%s: %.2f us against bytemap %.2f" % (name(r), r["median_us"], b["median_us"])))
    report("bitmap no slower than bytemap", pairs)

    rows = [r for r in recs if r["pass"] == "fwd" and r["format"] == "bitmap" and r["mode"] == "te" and
            r["T"] >= 16384 and r["E"] <= 512]
    for what, f, t, st, empty in (("launch", "pct_of_floor", "median_us", "stream_us", "empty_us"),
                                  ("batch", "pct_of_floor_batch", "batch_us", "stream_batch_us", "empty_batch_us")):
        if any(f not in r for r in rows):  # files from before the batch time (2b8edbf) have no batch figures
            print("75%% of the floor by the %s time: not in this file" % what)
            continue
        pairs, copy_misses = [], 0
        for r in rows:
            what_row = "%s: %.1f%%" % (name(r), r[f])
            if r[f] < 75.0 and empty in doc and st in r:
                fl, e = r["floor_us"], doc[empty]
                copy_pct = 100.0 * fl / r[st]
                if copy_pct < 75.0:
                    copy_misses += 1
                    what_row += "; a plain copy of the same bytes %.1f%%, under the line too" % copy_pct
                else:
                    rate = lambda us: "%.1f%%" % (100.0 * fl / (us - e)) if us > e else "-"
                    what_row += "; past an empty kernel's %.2f us it needs %s of the copy's rate, runs at %s (a plain " \
                                "copy: %s)" % (e, rate(fl / 0.75), rate(r[t]), rate(r[st]))
            pairs.append((r[f] >= 75.0, what_row))
        report("75%% of the floor by the %s time" % what, pairs)
        if copy_misses:
            print("  (%d of the misses where a plain copy of the same bytes misses too)" % copy_misses)

    pairs = []
    for r in recs:
        if r["pass"] == "bwd" and r["dtype"] == "bf16" and r["mode"] == "recompute":
            s = by.get(tuple((f, "saved" if f == "mode" else v) for f, v in key(r)))
            if s is not None:
                pairs.append((r["median_us"] < s["median_us"],
                              "%s: %.2f us against saved %.2f" % (name(r), r["median_us"], s["median_us"])))
    report("recompute faster than saved (bf16)", pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
