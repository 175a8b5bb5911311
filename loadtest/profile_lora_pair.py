"""Run one shrink+expand pair of a benchmark case a few times, for a profiler to look at.

    ncu --kernel-name regex:lora --launch-skip 4 --launch-count 2 --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 loadtest/profile_lora_pair.py o 8 decode-distinct-256

Arguments are a case of loadtest/bench_lora_kernels.py (projection, rank, scenario). The pair
runs 4 times to compile and warm up, then twice more: skip the first 4 launches of each kernel.
"""

from __future__ import annotations

import sys

import torch

from loadtest.bench_lora_kernels import PROJECTIONS, NUM_SLOTS, Pool, make_pairs, ours


def main(argv: list[str]) -> int:
    proj, rank, scenario = argv
    rank = rank if rank == "mixed" else int(rank)
    device = torch.device("cuda")
    pool = Pool(*PROJECTIONS[proj], rank, NUM_SLOTS, device)
    pair = make_pairs(pool, scenario, 1, device)[0]
    run = ours(pool)
    for _ in range(6):
        run(pair, pair.y)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
