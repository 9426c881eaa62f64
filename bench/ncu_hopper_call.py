"""Two calls of the Hopper kernel per precision on a Wan-like layout (T=31, W=4, 1536-token frames, 12 x 128, bf16),
for Nsight Compute: the second call of each precision is the one to profile.

    ncu --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats \\
        -k regex:hopper --launch-skip 1 --launch-count 1 python3 bench/ncu_hopper_call.py int8_qk
"""
import sys

import torch

from lvsa_kernels import LVSAPattern
from lvsa_kernels.triton_src.launch import run_scheduled
from lvsa_kernels.triton_src.schedule import build_key_tiles, build_schedule
from lvsa_kernels.triton_src.tuning import hopper_configs


def main(precisions: str) -> None:
    layout = LVSAPattern(window=4).plan(31, 1536, step=0)
    q, k, v = (torch.randn(1, layout.q_len, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sched = build_schedule(layout, 128, q.device)
    for precision in precisions.split(","):
        tiles = build_key_tiles(layout, 128, q.device, precision)
        cfg = hopper_configs(128, precision)[1]  # 128 x 128, 3 stages
        for _ in range(2):
            run_scheduled(q, k, v, sched, False, 0.088, cfg, precision=precision, key_tiles=tiles)
        torch.cuda.synchronize()
        print("done", precision, cfg, flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "exact")
