"""GPTQ (Frantar et al., 2022, arXiv:2210.17323), kept apart from the number format.

The algorithm sees the format only through :class:`Format`, a handful of small functions with one-line contracts;
:func:`nvfp4_format` supplies NVFP4's (two-level scales: one global scale, one e4m3 scale per 16 columns along K).
The math is the paper's Algorithm 1 with lazy block updates:

    H    = 2 X X^T / n                     (fp32, running mean over the calibration rows, see Hessian)
    dead = diag(H) == 0:  H_ii = 1, W[:, i] = 0
    H    = (1 - shrink) * H + shrink * diag(H)      (optional: weaker cross-column terms, see gptq())
    H   += percdamp * mean(diag(H)) * I
    U    = cholesky(H^-1, upper)
    for each column i (in blocks of `blocksize`):  q_i = Q(w_i);  e = (w_i - q_i) / U_ii;  W[:, i:] -= e U[i, i:]
    P    = refit(W, codes, P, H)           (optional: group params refitted for the codes, see gptq())
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from . import format as nvfp4

ScaleSearch = Literal["none", "four_over_six", "mse"]
ScaleTiming = Literal["sweep", "upfront"]

# Which value the block's largest magnitude is mapped to, for each candidate scale the search tries.
SCALE_TARGETS: dict[str, tuple[float, ...]] = {
    "none": (6.0,),  # the reference: amax -> 6
    "four_over_six": (6.0, 4.0),  # per block, amax -> 6 or amax -> 4, whichever gives the smaller error
    "mse": (6.0, 5.5, 5.0, 4.5, 4.0),  # a small grid between the two
}


@dataclass(frozen=True)
class Format:
    """A group-wise number format, as GPTQ needs it. ``T`` are tensor params, ``P`` per-group params ``[N, G]``.

    tensor_params(w [N, K]) -> T
    group_params(w [N, G, size], T, importance [G, size] | None) -> P [N, G]
    quantize(w [N, m], P [N, m], T) -> codes [N, m]      (elementwise, each element with its group's params)
    dequantize(codes [N, m], P [N, m], T) -> fp32 values [N, m]
    finish(codes [N, K], P [N, K/size], T) -> the quantized tensor (dequantizes to exactly those values)
    refit(w [N, K], codes [N, K], P [N, G], T, h [K, K]) -> P  (params no worse than P for these codes, by
                                                               tr((W - Q) H (W - Q)^T))
    """

    group_size: int
    tensor_params: Callable
    group_params: Callable
    quantize: Callable
    dequantize: Callable
    finish: Callable
    refit: Callable


def _nvfp4_quantize(x: torch.Tensor, scales: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return nvfp4.e2m1_codes((x * nvfp4.encode_scales(scales, pts)).clamp(-nvfp4.F4_E2M1_MAX, nvfp4.F4_E2M1_MAX))


def _nvfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return nvfp4.e2m1_to_float(codes) * scales.float() * pts  # same operation order as format.dequantize_parts


def _nvfp4_finish(codes: torch.Tensor, scales: torch.Tensor, pts: torch.Tensor) -> nvfp4.NVFP4Tensor:
    return nvfp4.NVFP4Tensor(nvfp4.pack(codes), scales, pts)


def search_block_scales(x: torch.Tensor, pts: torch.Tensor, targets: tuple[float, ...],
                        importance: torch.Tensor | None = None) -> torch.Tensor:
    """e4m3 scales for fp32 blocks ``x`` ``[..., G, 16]``: per block, the candidate with the least weighted error.

    Candidate ``t`` maps the block's amax to ``t`` (``targets[0] == 6`` is the reference scale, which wins ties).
    The error is ``sum_j importance_j * (x_j - dq(x_j))^2`` (``importance`` ``[G, 16]``, e.g. diag(H); None: 1).
    """
    amax = x.abs().amax(dim=-1)
    best_scale, best_err = None, None
    for t in targets:
        s = (amax / t / pts).clamp(min=nvfp4.F8_E4M3_MIN_SCALE, max=nvfp4.F8_E4M3_MAX).to(torch.float8_e4m3fn)
        if len(targets) == 1:
            return s
        sq = s.unsqueeze(-1)
        err = (x - _nvfp4_dequantize(_nvfp4_quantize(x, sq, pts), sq, pts)).square()
        if importance is not None:
            err = err * importance
        err = err.sum(dim=-1)
        if best_scale is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err
            best_scale = torch.where(better, s.view(torch.uint8), best_scale.view(torch.uint8)).view(s.dtype)
            best_err = torch.where(better, err, best_err)
    return best_scale


def _e4m3_bits(value: float) -> int:
    return int(torch.tensor(value).to(torch.float8_e4m3fn).view(torch.uint8))


# The reference's block-scale range as e4m3 bit patterns (0x08 and 0x7E; the step to 0x7F would be NaN).
_E4M3_SMALLEST_SCALE = _e4m3_bits(nvfp4.F8_E4M3_MIN_SCALE)
_E4M3_LARGEST_FINITE = _e4m3_bits(nvfp4.F8_E4M3_MAX)


def refit_block_scales(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, pts: torch.Tensor,
                       h: torch.Tensor, sweeps: int = 2, reach: int = 2) -> torch.Tensor:
    """e4m3 block scales for fixed e2m1 ``codes`` that lower each row's ``(w - q) H (w - q)^T`` (``q`` the values
    they dequantize to): coordinate descent over the blocks, ``sweeps`` times, each block trying the e4m3 values
    up to ``reach`` steps either side of its scale (within the reference's range, 2**-6 to 448) and keeping the best
    (its own when none is better).

    With ``r = w - q`` and ``g = r H``, moving block ``b``'s values by ``d`` changes the error by
    ``-2 d . g_b + d H_bb d`` (H symmetric), and ``g`` then by ``-d H_b``: one block costs O(N * 16 * K).
    """
    n, k = w.shape
    size = nvfp4.BLOCK_SIZE
    per_scale = nvfp4.e2m1_to_float(codes) * pts  # [N, K]: the values a block scale of 1 gives
    bits = scales.view(torch.uint8).long().clone()  # [N, G]
    value = scales.float().clone()
    g = (w - (per_scale.unflatten(1, (-1, size)) * value.unsqueeze(-1)).flatten(1)) @ h
    steps = torch.tensor([0, *range(-reach, 0), *range(1, reach + 1)], device=w.device)  # 0 first: ties keep it
    for _ in range(sweeps):
        for b in range(k // size):
            cols = slice(b * size, (b + 1) * size)
            v, gb = per_scale[:, cols], g[:, cols]
            cand = (bits[:, b, None] + steps).clamp(_E4M3_SMALLEST_SCALE, _E4M3_LARGEST_FINITE)  # [N, C]
            d = (_e4m3_value(cand) - value[:, b, None]).unsqueeze(-1) * v.unsqueeze(1)  # [N, C, 16]
            change = -2 * (d * gb.unsqueeze(1)).sum(-1) + ((d @ h[cols, cols]) * d).sum(-1)  # [N, C]
            best = change.argmin(dim=1, keepdim=True)
            g -= d.gather(1, best.unsqueeze(-1).expand(-1, -1, size)).squeeze(1) @ h[cols]
            bits[:, b] = cand.gather(1, best).squeeze(1)
            value[:, b] = _e4m3_value(bits[:, b])
    return bits.to(torch.uint8).view(torch.float8_e4m3fn)


def _e4m3_value(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.uint8).view(torch.float8_e4m3fn).float()


def nvfp4_format(search: ScaleSearch = "none") -> Format:
    """NVFP4 as a :class:`Format`: T = the global scale (from the weight's amax), P = e4m3 block scales."""
    targets = SCALE_TARGETS[search]
    return Format(
        group_size=nvfp4.BLOCK_SIZE,
        tensor_params=nvfp4.global_scale_of,
        group_params=lambda w, pts, importance=None: search_block_scales(w, pts, targets, importance),
        quantize=_nvfp4_quantize,
        dequantize=_nvfp4_dequantize,
        finish=_nvfp4_finish,
        refit=refit_block_scales,
    )


class Hessian:
    """Running mean of ``2 x x^T`` over the rows of ``x`` (``[..., K]``), accumulated in fp32: ``H = 2 X X^T / n``.

    With ``asymmetric``, :meth:`add` also takes ``ref``, the same rows as the unquantized model computes them, and
    keeps the cross term ``C = 2 (R - X)^T X / n`` that :func:`asymmetric_target` needs.
    """

    def __init__(self, k: int, device: torch.device | str | None = None, asymmetric: bool = False):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.cross = torch.zeros_like(self.h) if asymmetric else None
        self.n = 0

    def add(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        k = self.h.shape[0]
        x = x.detach().reshape(-1, k).float()
        keep = self.n / (self.n + x.shape[0])
        self.n += x.shape[0]
        x = x * math.sqrt(2 / self.n)
        self.h.mul_(keep).addmm_(x.t(), x)
        if self.cross is not None:
            d = ref.detach().reshape(-1, k).float() * math.sqrt(2 / self.n) - x
            self.cross.mul_(keep).addmm_(d.t(), x)


def _live_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 copy of H whose dead columns (diagonal 0: that input is always 0) have diagonal 1, and their mask."""
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    return h, dead


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, alpha: float,
                      percdamp: float = 0.01, retries: int = 4) -> torch.Tensor:
    """The weight GPTQ should aim at so that the layer, fed the quantized model's inputs X, matches the unquantized
    layer fed the unquantized model's inputs R: the weight correction of QEP (arXiv:2504.09629), the same
    objective as GPTAQ's asymmetric calibration (arXiv:2504.02692).

    ``W* = W + alpha W C (H + damp I)^-1`` with ``C = 2 (R - X)^T X / n``; alpha = 1 is the least-squares fit of
    ``W R`` from X (then ``|Q X - W R|^2 = |(Q - W*) X|^2 + const``), smaller alpha trusts the calibration data less.
    If no dampening (percdamp x 10 per retry, as in :func:`gptq`) makes H positive definite, the target is W itself,
    with a warning.
    """
    w = weight.detach().float()
    h, _ = _live_hessian(hessian)
    factor = _damped_cholesky(h, percdamp, retries)
    if factor is None:
        warnings.warn(f"asymmetric GPTQ target: Hessian not positive definite even with "
                      f"percdamp={percdamp * 10**retries:g}; aiming at the layer's own weight", RuntimeWarning,
                      stacklevel=2)
        return w
    correction = torch.cholesky_solve((w @ cross.float()).t(), factor[0]).t()
    return w + alpha * correction


@dataclass
class GPTQResult:
    """What :func:`gptq` produced. ``percdamp`` is the dampening that worked; ``fallback`` says why RTN was used."""

    quantized: object
    dequantized: torch.Tensor  # fp32 [N, K], exactly the values ``quantized`` stands for
    percdamp: float
    fallback: str | None = None


def _damped_cholesky(h: torch.Tensor, percdamp: float, retries: int,
                     then=lambda lower: lower) -> tuple[torch.Tensor, float] | None:
    """``then(cholesky(H + damp I))`` and the percdamp that worked: where the factorization fails, or ``then``
    returns None or non-finite values, multiply percdamp by 10 and retry. None if all ``retries + 1`` tries fail."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    for _ in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(h + percdamp * mean_diag * eye)
        if info == 0:
            factor = then(lower)
            if factor is not None and torch.isfinite(factor).all():
                return factor, percdamp
        percdamp *= 10
    return None


def _upper_cholesky_of_inverse(h: torch.Tensor, percdamp: float, retries: int) -> tuple[torch.Tensor, float] | None:
    """``cholesky(inverse(H + damp I), upper)`` and the percdamp that worked (see :func:`_damped_cholesky`)."""
    def upper_of_inverse(lower):
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        return upper if info == 0 else None

    return _damped_cholesky(h, percdamp, retries, upper_of_inverse)


def rtn(weight: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> GPTQResult:
    """Round-to-nearest: every group's params from ``weight``, every element rounded on its own."""
    w = weight.detach().float()
    n, k = w.shape
    t = fmt.tensor_params(w)
    imp = None if importance is None else importance.reshape(-1, fmt.group_size)
    p = fmt.group_params(w.reshape(n, -1, fmt.group_size), t, imp)  # [N, G]
    pe = p.repeat_interleave(fmt.group_size, dim=1)
    codes = fmt.quantize(w, pe, t)
    return GPTQResult(fmt.finish(codes, p, t), fmt.dequantize(codes, pe, t), 0.0)


def check_shrink(shrink: float) -> None:
    """Raise ValueError unless ``shrink`` (see :func:`gptq`) lies in [0, 1]."""
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must be between 0 and 1, got {shrink}")


def check_refit_rounds(refit_rounds: int) -> None:
    """Raise ValueError unless ``refit_rounds`` (see :func:`gptq`) is 0 or more."""
    if refit_rounds < 0:
        raise ValueError(f"refit_rounds must be 0 or more, got {refit_rounds}")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, *, percdamp: float = 0.01,
         blocksize: int = 128, act_order: bool = False, scale_timing: ScaleTiming = "upfront",
         shrink: float = 0.0, refit_rounds: int = 0, retries: int = 4) -> GPTQResult:
    """Quantize ``weight`` ``[N, K]`` given its layer's input Hessian ``[K, K]`` (see :class:`Hessian`).

    scale_timing: "sweep" sets each group's params when the sweep reaches it, from the error-updated weights, and
    freezes them; "upfront" sets all from the original weight. act_order (columns by descending diag(H)) keeps the
    groups along the original K, so it needs "upfront". shrink (0 to 1) scales H's off-diagonal terms by
    ``1 - shrink`` (a shrinkage towards its diagonal): the error of each column is carried less onto the columns
    correlated with it in the calibration data, while each column's weight in the scale search and act-order
    stays; 1 leaves no error feedback. refit_rounds: after the sweep, the group params are set anew for the codes
    it chose (``Format.refit``, by the same H); each further round sweeps again with those params and refits
    again. If no dampening (percdamp x 10 per retry) makes H positive definite, the layer falls back to :func:`rtn`
    with a warning.
    """
    check_shrink(shrink)
    if act_order and scale_timing != "upfront":
        raise ValueError("act_order keeps groups along the original K, so it needs scale_timing='upfront'")
    check_refit_rounds(refit_rounds)
    g = fmt.group_size
    if blocksize % g:
        raise ValueError(f"blocksize must be a multiple of the group size {g}, got {blocksize}")
    w = weight.detach().float().clone()  # [N, K]
    n, k = w.shape
    h, dead = _live_hessian(hessian)  # [K, K]
    assert h.shape == (k, k), f"Hessian {tuple(h.shape)} does not match weight {tuple(w.shape)}"
    if shrink:
        h = (1 - shrink) * h + shrink * torch.diag(h.diagonal())
    w[:, dead] = 0
    target, target_h = w, h  # what a refit aims at, in the original column order
    importance = h.diagonal().clone()  # [K], original column order
    t = fmt.tensor_params(weight.detach().float())
    params = fmt.group_params(w.reshape(n, -1, g), t, importance.reshape(-1, g))  # [N, K/g]; "sweep" redoes them
    group_of = torch.arange(k, device=w.device) // g  # group of each column, in sweep order
    perm = torch.argsort(importance, descending=True) if act_order else None
    if act_order:
        w, h, group_of = w[:, perm], h[perm][:, perm], group_of[perm]

    factor = _upper_cholesky_of_inverse(h, percdamp, retries)
    if factor is None:
        warnings.warn(f"GPTQ: Hessian not positive definite even with percdamp={percdamp * 10**retries:g}; "
                      "using round-to-nearest for this layer", RuntimeWarning, stacklevel=2)
        result = rtn(weight, fmt)
        result.fallback = "Cholesky failed: round-to-nearest"
        return result
    hinv, used_damp = factor

    sweep_sets_params = scale_timing == "sweep"
    for round_ in range(refit_rounds + 1):
        if round_:
            params = fmt.refit(target, codes, params, t, target_h)
            if round_ == refit_rounds:
                break
            sweep_sets_params = False
        codes = _sweep(w, hinv, params, group_of, fmt, t, blocksize, importance if sweep_sets_params else None)
        if act_order:
            codes = codes[:, torch.argsort(perm)]
    pe = params.repeat_interleave(g, dim=1)
    return GPTQResult(fmt.finish(codes, params, t), fmt.dequantize(codes, pe, t), used_damp)


def _sweep(w: torch.Tensor, hinv: torch.Tensor, params: torch.Tensor, group_of: torch.Tensor, fmt: Format, t,
           blocksize: int, importance: torch.Tensor | None) -> torch.Tensor:
    """The column sweep of :func:`gptq` over ``w`` (in sweep order; not modified): codes in sweep order. With
    ``importance``, each group's params are set (in ``params``, in place) when the sweep reaches the group."""
    w = w.clone()
    n, k = w.shape
    g = fmt.group_size
    codes = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if importance is not None and col % g == 0:
                imp = importance[col:col + g].unsqueeze(0)
                params[:, col // g] = fmt.group_params(w1[:, i:i + g].unsqueeze(1), t, imp)[:, 0]
            p = params[:, group_of[col]].unsqueeze(1)  # [N, 1]
            wi = w1[:, i:i + 1]  # [N, 1]
            c = fmt.quantize(wi, p, t)
            codes[:, col] = c[:, 0]
            e = (wi - fmt.dequantize(c, p, t)) / hinv1[i, i]
            w1[:, i:] -= e * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: ``tr(dW H dW^T) / tr(W H W^T)``, ``dW = W - Q``."""
    w = weight.detach().float()
    d = w - dequantized
    denom = ((w @ hessian) * w).sum()
    return float(((d @ hessian) * d).sum() / denom) if denom > 0 else 0.0
