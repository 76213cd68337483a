"""Time grouped GEMMs (one launch for the linears that share an input) against one GEMM per linear, on one GPU.

    PYTHONPATH=. python3 tools/bench_groups.py [--out groups.json] [--ms 1,16,128,1024]

Groups of a Llama-3-8B layer: q/k/v (N = 4096, 1024, 1024) and gate/up (N = 14336, 14336), K = 4096. Per group and
batch M, CUDA-graph replays over enough weight copies to miss L2 (``bench_gemm.graph_us``) of: cuBLAS bf16
``F.linear`` per weight, fp4compile nvfp4a16 with one ``fp4.gemm_a16`` op per weight, and one op over the group,
each compiled by torch.compile as the backend runs them. Every grouped output is compared with the separate one:
equal, unless the two launches chose configurations that split K differently (``rel_diff``: the largest
difference relative to the largest output). JSON goes to --out (default $OUT/bench_groups.json when OUT is set);
a table is printed last.
"""

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from bench_gemm import graph_us, write_rows

from fp4compile import format as nvfp4

GROUPS = {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)}
K = 4096


def bench(name: str, ns: tuple[int, ...], m: int) -> dict:
    weights = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) for n in ns]
    packed = [nvfp4.quantize(w) for w in weights]
    parts = [[q.packed for q in packed], [q.scales.view(torch.uint8) for q in packed], [q.global_scale for q in packed]]
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    group = torch.compile(lambda x, p, s, t: torch.ops.fp4.gemm_a16(x, p, s, t, [None] * len(p)), dynamic=False)
    separate = torch.compile(lambda x, p, s, t: [torch.ops.fp4.gemm_a16(x, [p_], [s_], [t_], [None])[0]
                                                 for p_, s_, t_ in zip(p, s, t)], dynamic=False)
    # Bit-equal unless the two pick different kernel configs (a K split sums in another order).
    diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
               for a, b in zip(group(x, *parts), separate(x, *parts)))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    fp4_bytes, bf16_bytes = sum(ns) * K * 9 / 16, sum(ns) * K * 2
    fp4_copies = [[[t.clone() for t in part] for part in parts] for _ in range(max(2, math.ceil(3 * l2 / fp4_bytes)))]
    bf16_copies = [[w.clone() for w in weights] for _ in range(max(2, math.ceil(3 * l2 / bf16_bytes)))]
    row = {"group": name, "N": ns, "K": K, "M": m, "rel_diff": diff,
           "bf16_us": graph_us([lambda ws=ws: [F.linear(x, w) for w in ws] for ws in bf16_copies]),
           "separate_us": graph_us([lambda c=c: separate(x, *c) for c in fp4_copies]),
           "group_us": graph_us([lambda c=c: group(x, *c) for c in fp4_copies])}
    row["group_vs_separate_x"] = row["separate_us"] / row["group_us"]
    row["group_vs_bf16_x"] = row["bf16_us"] / row["group_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ["OUT"], "bench_groups.json") if "OUT" in os.environ else None
    parser.add_argument("--out", default=default_out, help="JSON results path")
    parser.add_argument("--ms", default="1,16,128,1024", help="batch sizes M")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    for name, ns in GROUPS.items():
        for m in map(int, args.ms.split(",")):
            torch._dynamo.reset()
            rows.append(bench(name, ns, m))
            print(json.dumps(rows[-1]), flush=True)
            write_rows(args.out, rows)
    print(f"\n{torch.cuda.get_device_name()}, CUDA-graph replays, us per call (all weights of the group)")
    print(f"{'group':>8} {'M':>5} | {'bf16':>7} {'separate':>8} {'group':>7} | {'vs sep.':>7} {'vs bf16':>7} rel_diff")
    for r in rows:
        print(f"{r['group']:>8} {r['M']:>5} | {r['bf16_us']:7.1f} {r['separate_us']:8.1f} {r['group_us']:7.1f} | "
              f"{r['group_vs_separate_x']:6.2f}x {r['group_vs_bf16_x']:6.2f}x {r['rel_diff']:.1e}")


if __name__ == "__main__":
    main()
