"""The main job: a built-in small transformer compiled with ``backend="fp4"``, on whatever device is here.

    python -m fp4compile.demo [--layers 4] [--dim 256] [--tokens 128] [--device cuda]

Prints which layers were rewritten, the error of each NVFP4 scheme against the bf16 model, and compile and run
time against ``torch.compile`` with its default backend.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from .backend import explain


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight


class Block(nn.Module):
    """A Llama-style block: attention with q/k/v/o projections, then a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.o_proj(attn)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1024, dim: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, 4 * dim) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _timed(fn, *args, repeat: int = 10) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds (synchronising on CUDA)."""
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _compile_and_time(model, tokens, **compile_kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_kwargs)
    start = time.perf_counter()
    out = compiled(tokens)
    compile_s = time.perf_counter() - start
    return out, compile_s, _timed(compiled, tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyTransformer(dim=args.dim, layers=args.layers).to(args.device, torch.bfloat16).eval()
    tokens = torch.randint(0, 1024, (1, args.tokens), device=args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"TinyTransformer: {args.layers} layers, dim {args.dim}, bf16, {args.tokens} tokens on {device_name}\n")

    with torch.inference_mode():
        print(explain(model, tokens), "\n")
        reference = model(tokens).float()
        rows = [("torch.compile default", *_compile_and_time(model, tokens))]
        for scheme in ("nvfp4a16", "nvfp4"):
            rows.append((f"fp4 {scheme}", *_compile_and_time(model, tokens, backend="fp4", options={"scheme": scheme})))

    base_ms = rows[0][3]
    print(f"{'variant':<24}{'rel. error vs bf16':>20}{'compile s':>12}{'run ms':>10}{'speed':>8}")
    for name, out, compile_s, run_ms in rows:
        err = ((out.float() - reference).norm() / reference.norm()).item()
        print(f"{name:<24}{err:>20.4f}{compile_s:>12.1f}{run_ms:>10.2f}{base_ms / run_ms:>7.2f}x")


if __name__ == "__main__":
    main()
