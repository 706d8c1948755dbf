#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A kernel's fixed cost and its rate, from router_bench forward rows at several token counts.

  bench/token_fit.py bench.txt

bench.txt: device-check's abpatch output (sections "# abpatch run N: <build>", read by ab_summary.parse). For each
build and forward bitmap row (E, config, dtype, mode), over the token counts it ran: the minimum time of each T over the
build's runs, then the least-squares line time = fixed + slope * T / 16384, the same for the stream copy of the row's
bytes and for the batch time, the floor of 16384 tokens, and the % of the floor at each T. A row whose slope is the
stream's and whose fixed cost is above the stream's misses the floor at small T by that fixed cost alone
(bench/NOTES.md, "Router v71").
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_summary import parse  # noqa: E402


def forward_rows(path):
    """{build: {(E, config, dtype, mode, T): [Row of each run]}}: the forward bitmap rows."""
    builds = collections.OrderedDict()
    for (_, build), rows in parse(path).items():
        by_row = builds.setdefault(build, collections.defaultdict(list))
        for (T, E, _, cfg, dt, fmt, ps, mode), r in rows.items():
            if ps == "fwd" and fmt == "bitmap":
                by_row[(int(E), cfg, dt, mode, int(T))].append(r)
    return builds


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main():
    for build, rows in forward_rows(sys.argv[1]).items():
        print("#", build)
        print("# E config dtype mode | time at each T (us) | slope / 16384 tokens, fixed (us) | stream's | batch's | "
              "floor of 16384 tokens | % of the floor at each T")
        for key in sorted({k[:4] for k in rows}):
            Ts = sorted(k[4] for k in rows if k[:4] == key)
            if len(Ts) < 2:
                continue
            time, floor, stream, batch = ([min(getattr(r, f) for r in rows[key + (T,)]) for T in Ts]
                                          for f in ("time", "floor", "stream", "batch"))
            x = [T / 16384 for T in Ts]
            (a, b), (sa, sb), (ba, bb) = fit(x, time), fit(x, stream), fit(x, batch)
            floor16 = floor[0] * 16384 / Ts[0]
            print("%4d %-12s %-4s %-7s | %s | %6.2f %5.2f | %6.2f %5.2f | %6.2f %5.2f | %6.2f | %s" %
                  (key + (" ".join("%7.2f" % t for t in time), b, a, sb, sa, bb, ba, floor16,
                          " ".join("%5.1f" % (100 * f / t) for f, t in zip(floor, time)))))


if __name__ == "__main__":
    main()
