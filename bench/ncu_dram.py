#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The bytes a router forward launch and the plain copies of the same bytes move, from Nsight Compute's CSV.

  bench/ncu_dram.py NCU.csv T E DTYPE

NCU.csv: `ncu --csv --print-units base --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,
lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_write.sum` over router_bench's launches of one
TE-compatible bitmap row (router_forward_bucket) and of its stream kernels (scripts/device-check.sh, PHASES=dram).
T, E, DTYPE (bf16 | fp32): the row, for the bytes its floor counts (logits read; probs, saved and the bitmap written).
Prints, per kernel, the launches seen and the medians of their duration, the bytes they read and wrote at the L2 (from
the SMs) and at DRAM, each also as a share of the floor's bytes. Exit status 2 when no launch was read.
"""
import csv
import statistics
import sys

METRICS = {
    "gpu__time_duration.sum": "ns",
    "dram__bytes_read.sum": "dram_rd",
    "dram__bytes_write.sum": "dram_wr",
    "lts__t_sectors_srcunit_tex_op_read.sum": "l2_rd",
    "lts__t_sectors_srcunit_tex_op_write.sum": "l2_wr",
}


def group(kernel):
    """A short name: the router kernel, or the stream kernel's shape."""
    if "router_forward_bucket" in kernel:
        return "router_forward_bucket"
    if "stream_kernel_strided" in kernel:
        return "stream_kernel_strided"
    if "stream_kernel<" in kernel:  # its shape: "stream_kernel<2>(<unnamed>::StreamArgs)" -> "stream_kernel<2>"
        return "stream_kernel<" + kernel.split("stream_kernel<", 1)[1].split(">", 1)[0] + ">"
    return kernel.split("(", 1)[0]


def number(text):
    return float(text.replace(",", ""))


def read(path):
    """{launch id: (group, {field: value})}"""
    launches = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next((i for i, r in enumerate(rows) if "Metric Name" in r and "Kernel Name" in r), None)
    if head is None:
        return launches
    cols = {name: i for i, name in enumerate(rows[head])}
    for r in rows[head + 1:]:
        if len(r) < len(cols) or r[cols["Metric Name"]] not in METRICS:
            continue
        lid = r[cols["ID"]]
        g, fields = launches.setdefault(lid, (group(r[cols["Kernel Name"]]), {}))
        fields[METRICS[r[cols["Metric Name"]]]] = number(r[cols["Metric Value"]])
    return launches


def main():
    if len(sys.argv) != 5 or sys.argv[4] not in ("bf16", "fp32"):
        sys.exit(__doc__)
    t, e = int(sys.argv[2]), int(sys.argv[3])
    esize = 2 if sys.argv[4] == "bf16" else 4
    read_b, write_b = t * e * esize, t * e * 8 + t * ((e + 7) // 8)
    launches = read(sys.argv[1])
    if not launches:
        print("%s: no launch with the metrics" % sys.argv[1], file=sys.stderr)
        return 2
    by = {}
    for g, fields in launches.values():
        if len(fields) == len(METRICS):
            by.setdefault(g, []).append(fields)
    print("# T = %d, E = %d, %s logits: the floor's bytes %.2f MB read, %.2f MB written" %
          (t, e, sys.argv[4], read_b / 1e6, write_b / 1e6))
    print("%-24s %8s %9s %16s %16s %16s %16s" %
          ("kernel", "launches", "time(us)", "L2 rd MB (%)", "L2 wr MB (%)", "DRAM rd MB (%)", "DRAM wr MB (%)"))
    for g in sorted(by):
        med = {f: statistics.median(x[f] for x in by[g]) for f in METRICS.values()}
        cell = lambda b, floor: "%8.2f (%5.1f)" % (b / 1e6, 100.0 * b / floor)
        print("%-24s %8d %9.2f %16s %16s %16s %16s" %
              (g, len(by[g]), med["ns"] / 1e3, cell(32 * med["l2_rd"], read_b), cell(32 * med["l2_wr"], write_b),
               cell(med["dram_rd"], read_b), cell(med["dram_wr"], write_b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
