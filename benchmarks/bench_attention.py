# python benchmarks/bench_attention.py
"""Causal attention alone, forward + backward, against T: minipar's blockwise op and torch's fused one.

minipar.ops.causal_attention on a packed qkv (B, T, 3C) and torch's
scaled_dot_product_attention(is_causal=True) (in the torch_gpt.py worker) are
timed in turns, CPU seconds, best of several, one thread each. Also printed:
the bytes minipar keeps for backward in attention probabilities,
B H T^2 (n + 1) / (2 n) numbers for n = T / ATTENTION_BLOCK query blocks,
against B H T^2 for a full (B, H, T, T) score array; torch's fused kernel keeps
only O(B H T) row statistics.
"""
import argparse
import pathlib
import sys
import time

from bench_torch import TORCH_MISSING, TORCH_PYTHON, ask, torch_worker
from common import BENCH_GPT, setup_process, write_json

setup_process()  # before numpy is imported

import numpy as np  # noqa: E402

from minipar import ops, transformer_ops  # noqa: E402
from minipar.autograd import Tensor  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="128,256,512,1024")
    parser.add_argument("--d-model", type=int, default=BENCH_GPT["d_model"])
    parser.add_argument("--heads", type=int, default=BENCH_GPT["n_head"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-python", default=str(TORCH_PYTHON))
    args = parser.parse_args(argv)
    B, H, C = args.batch, args.heads, args.d_model
    D = C // H
    gpt = dict(BENCH_GPT, d_model=C, n_head=H)
    proc = None
    if pathlib.Path(args.torch_python).exists():
        proc = torch_worker(args.torch_python, {"gpt": gpt, "batch": B, "lr": 1e-3, "betas": [0.9, 0.95],
                                                "eps": 1e-8})
    else:
        print(TORCH_MISSING)
    rng, rows = np.random.default_rng(0), []
    print(f"causal attention fwd+bwd, B {B} H {H} D {D} fp32, block {transformer_ops.ATTENTION_BLOCK}: "
          f"best of {args.repeats} CPU seconds")
    for T in map(int, args.seqs.split(",")):
        qkv = Tensor(rng.standard_normal((B, T, 3 * C), dtype=np.float32), requires_grad=True)
        g = np.ones((B, T, C), np.float32)
        mine, theirs = [], []
        for _ in range(args.repeats):
            cpu = time.process_time()
            ops.causal_attention(qkv, H).backward(g)
            mine.append(time.process_time() - cpu)
            qkv.grad = None
            if proc:
                theirs.append(ask(proc, f"attention {B} {H} {T} {D}")["cpu_s"])
        n = -(-T // transformer_ops.ATTENTION_BLOCK)                   # query blocks
        saved = B * H * T * T * (n + 1) / (2 * n) * 4
        row = {"T": T, "minipar_s": min(mine), "torch_s": min(theirs) if theirs else None,
               "saved_probs_mb": saved / 2 ** 20, "full_scores_mb": B * H * T * T * 4 / 2 ** 20}
        rows.append(row)
        vs = (f"torch {row['torch_s'] * 1e3:8.1f} ms  minipar/torch {row['minipar_s'] / row['torch_s']:.2f}"
              if theirs else "")
        print(f"T {T:5d}  minipar {row['minipar_s'] * 1e3:8.1f} ms  {vs}  probabilities kept "
              f"{row['saved_probs_mb']:.0f} MB (full B H T T: {row['full_scores_mb']:.0f} MB)", flush=True)
    if proc:
        proc.stdin.close()
        proc.wait(timeout=60)
    print(f"wrote {write_json('attention', {'batch': B, 'heads': H, 'd_model': C, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
