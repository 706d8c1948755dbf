#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A kernel's fixed cost and its rate, from router_bench forward rows at several token counts.

  bench/token_fit.py bench.txt

bench.txt: device-check's abpatch output (sections "== abpatch run N <build>: <command>") or a plain router_bench
output (one build, "base"). For each build and forward bitmap row (E, config, dtype, mode), over the token counts it
ran: the minimum time of each T over the runs, then the least-squares line time = fixed + slope * T / 16384, the same
for the stream copy of the row's bytes and for the batch time, the floor of 16384 tokens, and the % of the floor at
each T. A row whose slope is the stream's and whose fixed cost is above the stream's misses the floor at small T by
that fixed cost alone (bench/NOTES.md, "Router v71").
"""
import collections
import re
import sys


def parse(path):
    runs = collections.defaultdict(lambda: collections.defaultdict(list))
    build = "base"
    for line in open(path):
        m = re.match(r"== abpatch run \d+ (\S+): ", line)
        if m:
            build = m.group(1)
            continue
        if line.startswith("== abpatch summary"):
            break
        f = line.split()
        if len(f) >= 15 and f[0].isdigit() and f[6] == "fwd" and f[5] == "bitmap":
            T, E, _, cfg, dt, _, _, mode = f[:8]
            runs[build][(int(E), cfg, dt, mode, int(T))].append(
                (float(f[8]), float(f[9]), float(f[11]), float(f[14])))
    return runs


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main():
    runs = parse(sys.argv[1])
    for build, rows in runs.items():
        print("#", build)
        print("# E config dtype mode | time at each T (us) | slope / 16384 tokens, fixed (us) | stream's | batch's | "
              "floor of 16384 tokens | % of the floor at each T")
        for key in sorted({k[:4] for k in rows}):
            Ts = sorted(k[4] for k in rows if k[:4] == key)
            if len(Ts) < 2:
                continue
            best = [[min(r[i] for r in rows[key + (T,)]) for T in Ts] for i in range(4)]
            x = [T / 16384 for T in Ts]
            (a, b), (sa, sb), (ba, bb) = fit(x, best[0]), fit(x, best[2]), fit(x, best[3])
            floor16 = best[1][0] * 16384 / Ts[0]
            print("%4d %-12s %-4s %-7s | %s | %6.2f %5.2f | %6.2f %5.2f | %6.2f %5.2f | %6.2f | %s" %
                  (key + (" ".join("%7.2f" % t for t in best[0]), b, a, sb, sa, bb, ba, floor16,
                          " ".join("%5.1f" % (100 * f / t) for f, t in zip(best[1], best[0])))))


if __name__ == "__main__":
    main()
