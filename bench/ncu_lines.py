#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Where one kernel launch's warps stall, from Nsight Compute's per-SASS-line CSV.

  bench/ncu_lines.py router_forward_sass.csv [TOKENS]

The CSV is device-check's profile phase output (ncu --section SourceCounters --page source --print-source sass --csv,
carried in plots.tar). Prints the stall samples by reason, the lines holding the most samples with their two main
reasons, and the executed regions of the kernel's code (runs of SASS lines with executed instructions: index range,
static length, instructions executed, a token where TOKENS is given, and samples), which show how far apart in the
code the executed path lies.
"""
import collections
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def rows_of(path):
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    hdr, rows = None, []
    for row in csv.reader(lines):
        if row[0] == "Address":
            hdr = row
        elif hdr and len(row) == len(hdr):
            rows.append(dict(zip(hdr, row)))
    if hdr is None:
        sys.exit(f"{path}: no SASS-line table (an 'Address' header)")
    return hdr, rows


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    hdr, rows = rows_of(sys.argv[1])
    per = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    reasons = [c for c in hdr if c.startswith("stall_") and "Not Issued" not in c]
    samples_col, exec_col = "Warp Stall Sampling (All Samples)", "Instructions Executed"
    tot = collections.Counter()
    for d in rows:
        for c in reasons:
            tot[c] += num(d[c])
    samples = sum(num(d[samples_col]) for d in rows)
    executed = sum(num(d[exec_col]) for d in rows)
    print(f"{len(rows)} SASS lines, {executed:.0f} warp instructions executed ({executed / per:.1f} a unit of "
          f"{per:.0f}), {samples:.0f} stall samples")
    for c, v in tot.most_common():
        if v:
            print(f"  {c:24s} {v:7.0f} {100 * v / max(samples, 1):5.1f}%")
    print("lines with the most samples: index, samples, executed, instruction, two main reasons")
    for i, d in sorted(enumerate(rows), key=lambda x: -num(x[1][samples_col]))[:25]:
        top = sorted(((num(d[c]), c) for c in reasons), reverse=True)[:2]
        print(f"  {i:5d} {num(d[samples_col]):6.0f} {num(d[exec_col]):9.0f} {d['Source'].strip()[:56]:56s} "
              f"{top[0][1]}={top[0][0]:.0f} {top[1][1]}={top[1][0]:.0f}")
    print("executed regions: first and last line, static length, executed (a unit), samples")
    cur = None
    regions = []
    for i, d in enumerate(rows):
        if num(d[exec_col]) > 0:
            if cur is None:
                cur = [i, i, 0.0, 0.0]
            cur[1] = i
            cur[2] += num(d[exec_col])
            cur[3] += num(d[samples_col])
        elif cur is not None:
            regions.append(cur)
            cur = None
    if cur is not None:
        regions.append(cur)
    for a, b, e, s in regions:
        print(f"  {a:5d}-{b:5d} {b - a + 1:5d} {e / per:8.1f} {s:6.0f}")


if __name__ == "__main__":
    main()
