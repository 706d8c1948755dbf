#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Summary of device-check's abpatch phase: router_bench runs over the default build and patched builds.

  bench/ab_summary.py bench.txt

A run's rows carry the stream time of the same bytes by a plain copy kernel, measured in that run. Whole runs shift
by a few percent (the stream column with them: seen 2026-12-03, one run of four 3% faster in every row), so each
row's time is read over its run's stream time before the builds are compared; the raw minimum is printed beside it.
Per row: each build's minimum time (us) over its runs, then each patched build's ratio to the default build, raw and
normalised, and of the minimum batch times (a launch among back-to-back launches: what a dependent launch changes).
Last, per build: the bf16 rows where the recompute backward beat the saved one (the issue's target).
"""
import collections
import re
import sys


# A row's figures (us): its time, its floor, the stream copy's time and its batch time (nan where the output has no batch
# columns).
Row = collections.namedtuple("Row", "time floor stream batch")


def parse(path):
    """{(run number, build): {(T, E, k, config, dtype, format, pass, mode): Row}}, runs in file order."""
    runs = collections.OrderedDict()
    cur = None
    with open(path) as f:
        for line in f:
            m = re.match(r"# abpatch run (\d+): (\S+)", line)
            if m:
                cur = (int(m.group(1)), m.group(2))
                runs[cur] = collections.OrderedDict()
                continue
            if line.startswith("# runs:"):  # a summary appended to the same file (device-check's): not a run's rows
                cur = None
                continue
            fields = line.split()
            if cur and len(fields) in (14, 17) and fields[0].isdigit():  # 17: with the batch columns
                if fields[13] != "0":
                    print("WRONG VALUES:", cur, line.rstrip())
                key = tuple(fields[:8])  # T E k config dtype format pass mode
                batch = float(fields[14]) if len(fields) == 17 else float("nan")
                runs[cur][key] = Row(float(fields[8]), float(fields[9]), float(fields[11]), batch)
    # A run the budget skipped has its header line and no rows.
    return collections.OrderedDict((r, rows) for r, rows in runs.items() if rows)


def main():
    runs = parse(sys.argv[1])
    if not runs:
        sys.exit("no '# abpatch run' sections with router_bench rows in " + sys.argv[1])
    names = list(dict.fromkeys(name for _, name in runs))
    of = {n: [r for r in runs if r[1] == n] for n in names}
    rows = list(runs[of[names[0]][0]])

    def best(name, key, norm, field="time"):
        vals = [
            getattr(runs[r][key], field) / (runs[r][key].stream if norm else 1.0)
            for r in of[name]
            if key in runs[r] and (not norm or runs[r][key].stream > 0) and getattr(runs[r][key], field) > 0
        ]
        return min(vals) if vals else float("nan")

    print("# runs: " + ", ".join("%s x%d" % (n, len(of[n])) for n in names))
    print("# ratio = patched / %s: raw (of the minimum times), norm (of the minimum time / the run's stream time), "
          "batch (of the minimum batch times)" % names[0])
    head = "%6s %5s %3s %-12s %-5s %-8s %-4s %-9s" % ("T", "E", "k", "config", "dtype", "format", "pass", "mode")
    print(head + "".join(" %12s" % n[:12] for n in names) +
          "".join(" %8s %8s %8s" % ("raw", "norm", "batch") for _ in names[1:]))
    for key in rows:
        line = "%6s %5s %3s %-12s %-5s %-8s %-4s %-9s" % key
        line += "".join(" %12.2f" % best(n, key, False) for n in names)
        for n in names[1:]:
            ratios = []
            for norm, field in ((False, "time"), (True, "time"), (False, "batch")):
                b = best(names[0], key, norm, field)
                ratios.append(best(n, key, norm, field) / b if b > 0 else float("nan"))
            line += " %8.3f %8.3f %8.3f" % tuple(ratios)
        print(line)
    for n in names:
        hit = total = 0
        for key in rows:
            if key[4] != "bf16" or key[6] != "bwd" or key[7] != "recompute":
                continue
            saved = key[:7] + ("saved",)
            if saved not in runs[of[n][0]]:
                continue
            total += 1
            hit += best(n, key, False) < best(n, saved, False)
        if total:
            print("# %s: recompute faster than saved on %d of %d bf16 rows (minimum times)" % (n, hit, total))


if __name__ == "__main__":
    main()
