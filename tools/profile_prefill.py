"""Where the time of one compiled prefill goes: the top GPU kernels under torch.profiler, per configuration.

    PYTHONPATH=. python3 tools/profile_prefill.py [--layers 2] [--tokens 1024]

Runs on a CUDA GPU with a Llama-3-8B-shaped model (random bf16 weights) from ``tools/bench_e2e.py``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_e2e import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build("llama3-8b-shapes", args.layers, False, device, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)
    for name, kwargs in (("bf16", {}), ("nvfp4a16", {"backend": "fp4", "options": {"scheme": "nvfp4a16"}}),
                         ("nvfp4", {"backend": "fp4", "options": {"scheme": "nvfp4"}})):
        torch._dynamo.reset()
        compiled = torch.compile(model, **kwargs)
        with torch.no_grad():
            for _ in range(3):
                compiled(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                compiled(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            per_call_ms = (time.perf_counter() - start) / 5 * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                compiled(ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
        print(f"\n=== {name}: {per_call_ms:.2f} ms per prefill of {args.tokens} tokens, {args.layers} layers")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
