"""Run the decode attention of one benchmark case a few times, for a profiler to look at.

    ncu --clock-control none --kernel-name regex:paged_attention --launch-skip 4 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 loadtest/profile_attention.py llama2-7b decode-64x192 [nhd|hnd]

Arguments are a case of loadtest/bench_attention.py (model, scenario, cache layout). The kernel
runs 4 times to compile and warm up, then twice more: skip the first 4 launches.
"""

from __future__ import annotations

import sys

import torch

from loadtest.bench_attention import Case


def main(argv: list[str]) -> int:
    model, scenario, *rest = argv
    case = Case(model, scenario, torch.device("cuda"), layout=rest[0] if rest else "nhd")
    for _ in range(6):
        case.ours()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
