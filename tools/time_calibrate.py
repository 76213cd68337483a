"""Time ``fp4compile.calibrate`` on a SmolLM2-135M-shaped model, on the CPU or a GPU.

    PYTHONPATH=. python3 tools/time_calibrate.py [--device cuda] [--schemes nvfp4a16,nvfp4] [--samples 64]

The model is a Llama with SmolLM2-135M's shapes (30 layers, hidden 576, intermediate 1536; fp32, random weights)
from ``tools/bench_e2e.py``, and the data random token windows: GPTQ does the same work whatever the values, so
the time matches the real model's (``tools/eval_quality.py`` calibrates the real one, on the CPU, for quality).
Each scheme runs with ``calibrate``'s defaults (and ``--tune-steps``) on a fresh copy; JSON goes to --out, a short
table is printed last.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import build  # noqa: E402

import fp4compile  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--schemes", default="nvfp4a16,nvfp4")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tune-steps", type=int, default=0, help="calibrate's tune_steps (block output tuning)")
    p.add_argument("--tiny", action="store_true", help="tiny model sizes, for a dry run")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for scheme in args.schemes.split(","):
        model = build("smollm2-135m-shapes", 30, args.tiny, device, torch.float32)
        generator = torch.Generator().manual_seed(0)
        data = [torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=generator).to(device)
                for _ in range(args.samples)]
        start = time.perf_counter()
        report = fp4compile.calibrate(model, data, scheme=scheme, tune_steps=args.tune_steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"scheme": scheme, "seconds": time.perf_counter() - start, "layers": len(report.layers),
                     "samples": args.samples, "seq_len": args.seq_len, "tune_steps": args.tune_steps})
        print(report.summary(), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{name}: calibrate(), SmolLM2-135M shapes, {args.samples} x {args.seq_len} tokens, "
          f"tune_steps {args.tune_steps}")
    for r in rows:
        print(f"  {r['scheme']:>9}: {r['seconds']:7.1f} s for {r['layers']} layers")


if __name__ == "__main__":
    main()
