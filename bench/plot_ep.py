#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plots ep_bench's JSON (--json PATH): dispatch and combine GB/s against tokens per rank.

One PNG per (H, E, k, routing), two panels (dispatch, combine). Every curve is the same useful bytes
(bitep's bytes crossing to other GPUs, averaged over ranks) divided by a time (the slowest rank's median):
bitep, NCCL's own all-to-all of exactly those bytes, and the baseline pipeline (which moves more bytes to
deliver the same rows, so its curve is its effective rate). The dashed line is the measured GPU-to-GPU
copy ceiling of the run. A third PNG per shape shows the end-to-end speed-up (router + dispatch + combine)
over the baseline.

usage: plot_ep.py RESULT.json [--out DIR]
"""
import argparse
import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def gbps(nbytes, us):
    return nbytes / (us * 1e3) if us and us > 0 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="ep_bench --json output")
    ap.add_argument("--out", default=".", help="directory for the PNGs")
    args = ap.parse_args()
    with open(args.json) as f:
        run = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    groups = collections.defaultdict(list)
    for r in run["records"]:
        groups[(r["H"], r["E"], r["k"], r["routing"])].append(r)
    title = f'{run["card"]}, W={run["W"]}, {run["date"][:10]}, {run["commit"]}'
    written = []
    for (H, E, k, routing), recs in sorted(groups.items()):
        recs.sort(key=lambda r: r["T"])
        T = [r["T"] for r in recs]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, what, nbytes in (
            (axes[0], "dispatch", "cross_bytes"),
            (axes[1], "combine", "combine_cross_bytes"),
        ):
            a2a = "nccl_a2a_us" if what == "dispatch" else "nccl_a2a_combine_us"
            ax.plot(T, [gbps(r[nbytes], r[f"{what}_us"]) for r in recs], "o-", label=f"bitep {what}")
            if what == "dispatch" and all("dispatch_rank_major_us" in r for r in recs):
                ax.plot(T, [gbps(r[nbytes], r["dispatch_rank_major_us"]) for r in recs], "o-.",
                        label="bitep dispatch, rank-major only")
            ax.plot(T, [gbps(r[nbytes], r[a2a]) for r in recs], "s--", label="NCCL all-to-all, same bytes")
            ax.plot(T, [gbps(r[nbytes], r[f"baseline_{what}_us"]) for r in recs], "^:",
                    label="baseline pipeline (effective)")
            if run.get("p2p_GBps", 0) > 0:
                ax.axhline(run["p2p_GBps"], color="gray", ls="--", lw=1,
                           label=f'GPU-to-GPU copy {run["p2p_GBps"]:.0f} GB/s')
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per rank")
            ax.set_title(f"{what}: H={H} E={E} k={k}, {routing} routing")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("GB/s crossing to other GPUs (per rank)")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        name = os.path.join(args.out, f"ep_{H}_{E}_{k}_{routing}.png")
        fig.savefig(name, dpi=120)
        plt.close(fig)
        written.append(name)

    shapes = collections.defaultdict(dict)
    for (H, E, k, routing), recs in groups.items():
        shapes[(H, E, k)][routing] = sorted(recs, key=lambda r: r["T"])
    for (H, E, k), by_routing in sorted(shapes.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for routing, recs in sorted(by_routing.items()):
            ax.plot([r["T"] for r in recs],
                    [r["baseline_e2e_us"] / r["e2e_us"] if r["e2e_us"] > 0 else float("nan") for r in recs], "o-",
                    label=f"{routing} routing")
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("baseline time / bitep time")
        ax.set_title(f"router + dispatch + combine, H={H} E={E} k={k}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        name = os.path.join(args.out, f"ep_e2e_{H}_{E}_{k}.png")
        fig.savefig(name, dpi=120)
        plt.close(fig)
        written.append(name)
    for name in written:
        print(name)


if __name__ == "__main__":
    main()
