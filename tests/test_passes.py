"""Snapshots of the graphs the fp4 pass writes, and the forms it must (and must not) match.

Regenerate the snapshots after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/test_passes.py``.
"""

import torch
from torch import nn
from torch.testing._internal.common_utils import TestCase, run_tests

import fp4compile
from fp4compile.passes import WEIGHT_CACHE, Embedded, EmbeddedSet
from rewritten import rewrite


class One(nn.Module):
    def __init__(self, k=64, n=32, bias=False):
        super().__init__()
        self.fc = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False), nn.Linear(32, 16)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


class Block(nn.Module):
    """A transformer block's linears: q/k/v and gate/up each read one activation; o and down read their own."""

    def __init__(self, d=64, kv=64, ff=128):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False), nn.Linear(d, kv, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d, bias=False)

    def forward(self, x):
        h = x + self.o(self.q(x) * self.k(x) + self.v(x))
        return h + self.down(torch.relu(self.gate(h)) * self.up(h))


class Conv1D(nn.Module):
    """GPT-2's projection: the weight is stored [K, N] and applied as addmm(b, x, W)."""

    def __init__(self, k=32, n=48):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(k, n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class TestSnapshots(TestCase):
    def test_one_linear(self):
        graph, report, _ = rewrite(One(), torch.randn(4, 64))
        self.assertEqual(len(report.rewritten), 1)
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_fc_parameters_weight_: "f32[32, 64]", L_x_: "f32[4, 64]"):
        l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
        l_x_ = L_x_

        fp4_fc_packed: "u8[32, 32]" = self.fp4_fc_packed
        fp4_fc_scales: "u8[32, 4]" = self.fp4_fc_scales
        fp4_fc_pts: "f32[]" = self.fp4_fc_pts

        fc_gemm = torch.ops.fp4.gemm.default(l_x_, None, [fp4_fc_packed], [fp4_fc_scales], [fp4_fc_pts], [None]);  l_x_ = fp4_fc_packed = fp4_fc_scales = fp4_fc_pts = None

        fc_out = fc_gemm[0];  fc_gemm = None
        return (fc_out,)
""")

    def test_linear_with_bias_on_3d_input(self):
        graph, _, _ = rewrite(One(bias=True), torch.randn(2, 3, 64))
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_fc_parameters_weight_: "f32[32, 64]", L_self_modules_fc_parameters_bias_: "f32[32]", L_x_: "f32[2, 3, 64]"):
        l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
        l_self_modules_fc_parameters_bias_ = L_self_modules_fc_parameters_bias_
        l_x_ = L_x_

        fp4_fc_packed: "u8[32, 32]" = self.fp4_fc_packed
        fp4_fc_scales: "u8[32, 4]" = self.fp4_fc_scales
        fp4_fc_pts: "f32[]" = self.fp4_fc_pts

        fc_gemm = torch.ops.fp4.gemm.default(l_x_, None, [fp4_fc_packed], [fp4_fc_scales], [fp4_fc_pts], [l_self_modules_fc_parameters_bias_]);  l_x_ = fp4_fc_packed = fp4_fc_scales = fp4_fc_pts = l_self_modules_fc_parameters_bias_ = None

        fc_out = fc_gemm[0];  fc_gemm = None
        return (fc_out,)
""")

    def test_mlp(self):
        graph, _, _ = rewrite(MLP(), torch.randn(4, 32))
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_up_parameters_weight_: "f32[64, 32]", L_self_modules_up_parameters_bias_: "f32[64]", L_x_: "f32[4, 32]", L_self_modules_down_parameters_weight_: "f32[32, 64]", L_self_modules_down_parameters_bias_: "f32[32]"):
        l_self_modules_up_parameters_weight_ = L_self_modules_up_parameters_weight_
        l_self_modules_up_parameters_bias_ = L_self_modules_up_parameters_bias_
        l_x_ = L_x_
        l_self_modules_down_parameters_weight_ = L_self_modules_down_parameters_weight_
        l_self_modules_down_parameters_bias_ = L_self_modules_down_parameters_bias_

        fp4_up_packed: "u8[64, 16]" = self.fp4_up_packed
        fp4_up_scales: "u8[64, 2]" = self.fp4_up_scales
        fp4_up_pts: "f32[]" = self.fp4_up_pts

        up_gemm = torch.ops.fp4.gemm.default(l_x_, None, [fp4_up_packed], [fp4_up_scales], [fp4_up_pts], [l_self_modules_up_parameters_bias_]);  l_x_ = fp4_up_packed = fp4_up_scales = fp4_up_pts = l_self_modules_up_parameters_bias_ = None

        up_out = up_gemm[0];  up_gemm = None

        relu: "f32[4, 64]" = torch.relu(up_out);  up_out = None

        fp4_down_packed: "u8[32, 32]" = self.fp4_down_packed
        fp4_down_scales: "u8[32, 4]" = self.fp4_down_scales
        fp4_down_pts: "f32[]" = self.fp4_down_pts

        down_gemm = torch.ops.fp4.gemm.default(relu, None, [fp4_down_packed], [fp4_down_scales], [fp4_down_pts], [l_self_modules_down_parameters_bias_]);  relu = fp4_down_packed = fp4_down_scales = fp4_down_pts = l_self_modules_down_parameters_bias_ = None

        down_out = down_gemm[0];  down_gemm = None
        return (down_out,)
""")

    def test_qkv_share_one_input(self):
        graph, report, _ = rewrite(QKV(), torch.randn(4, 32))
        self.assertEqual([d.name for d in report.rewritten], ["q", "k", "v"])
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_q_parameters_weight_: "f32[32, 32]", L_x_: "f32[4, 32]", L_self_modules_k_parameters_weight_: "f32[16, 32]", L_self_modules_v_parameters_weight_: "f32[16, 32]", L_self_modules_v_parameters_bias_: "f32[16]"):
        l_self_modules_q_parameters_weight_ = L_self_modules_q_parameters_weight_
        l_x_ = L_x_
        l_self_modules_k_parameters_weight_ = L_self_modules_k_parameters_weight_
        l_self_modules_v_parameters_weight_ = L_self_modules_v_parameters_weight_
        l_self_modules_v_parameters_bias_ = L_self_modules_v_parameters_bias_

        fp4_q_packed: "u8[32, 16]" = self.fp4_q_packed
        fp4_q_scales: "u8[32, 2]" = self.fp4_q_scales
        fp4_q_pts: "f32[]" = self.fp4_q_pts
        q_act_pts = fp4compile_format_global_scale_of(l_x_)

        q_gemm = torch.ops.fp4.gemm.default(l_x_, q_act_pts, [fp4_q_packed], [fp4_q_scales], [fp4_q_pts], [None]);  fp4_q_packed = fp4_q_scales = fp4_q_pts = None

        q_out = q_gemm[0];  q_gemm = None
        fp4_k_packed: "u8[16, 16]" = self.fp4_k_packed
        fp4_k_scales: "u8[16, 2]" = self.fp4_k_scales
        fp4_k_pts: "f32[]" = self.fp4_k_pts

        k_gemm = torch.ops.fp4.gemm.default(l_x_, q_act_pts, [fp4_k_packed], [fp4_k_scales], [fp4_k_pts], [None]);  fp4_k_packed = fp4_k_scales = fp4_k_pts = None

        k_out = k_gemm[0];  k_gemm = None
        fp4_v_packed: "u8[16, 16]" = self.fp4_v_packed
        fp4_v_scales: "u8[16, 2]" = self.fp4_v_scales
        fp4_v_pts: "f32[]" = self.fp4_v_pts

        v_gemm = torch.ops.fp4.gemm.default(l_x_, q_act_pts, [fp4_v_packed], [fp4_v_scales], [fp4_v_pts], [l_self_modules_v_parameters_bias_]);  l_x_ = q_act_pts = fp4_v_packed = fp4_v_scales = fp4_v_pts = l_self_modules_v_parameters_bias_ = None

        v_out = v_gemm[0];  v_gemm = None
        return (q_out, k_out, v_out)
""")

    def test_qkv_and_gate_up_run_as_one_gemm_each(self):
        graph, report, _ = rewrite(Block(), torch.randn(4, 64), scheme="nvfp4a16")
        self.assertEqual(report.groups, [("q", "k", "v"), ("gate", "up")])
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_q_parameters_weight_: "f32[64, 64]", L_x_: "f32[4, 64]", L_self_modules_k_parameters_weight_: "f32[64, 64]", L_self_modules_v_parameters_weight_: "f32[64, 64]", L_self_modules_o_parameters_weight_: "f32[64, 64]", L_self_modules_gate_parameters_weight_: "f32[128, 64]", L_self_modules_up_parameters_weight_: "f32[128, 64]", L_self_modules_down_parameters_weight_: "f32[64, 128]"):
        l_self_modules_q_parameters_weight_ = L_self_modules_q_parameters_weight_
        l_x_ = L_x_
        l_self_modules_k_parameters_weight_ = L_self_modules_k_parameters_weight_
        l_self_modules_v_parameters_weight_ = L_self_modules_v_parameters_weight_
        l_self_modules_o_parameters_weight_ = L_self_modules_o_parameters_weight_
        l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
        l_self_modules_up_parameters_weight_ = L_self_modules_up_parameters_weight_
        l_self_modules_down_parameters_weight_ = L_self_modules_down_parameters_weight_

        fp4_q_packed: "u8[64, 32]" = self.fp4_q_packed
        fp4_q_scales: "u8[64, 4]" = self.fp4_q_scales
        fp4_q_pts: "f32[]" = self.fp4_q_pts
        fp4_k_packed: "u8[64, 32]" = self.fp4_k_packed
        fp4_k_scales: "u8[64, 4]" = self.fp4_k_scales
        fp4_k_pts: "f32[]" = self.fp4_k_pts
        fp4_v_packed: "u8[64, 32]" = self.fp4_v_packed
        fp4_v_scales: "u8[64, 4]" = self.fp4_v_scales
        fp4_v_pts: "f32[]" = self.fp4_v_pts

        q_k_v_gemm = torch.ops.fp4.gemm_a16.default(l_x_, [fp4_q_packed, fp4_k_packed, fp4_v_packed], [fp4_q_scales, fp4_k_scales, fp4_v_scales], [fp4_q_pts, fp4_k_pts, fp4_v_pts], [None, None, None], [4.649469337891787e-05, 4.649578113458119e-05, 4.650092523661442e-05]);  fp4_q_packed = fp4_k_packed = fp4_v_packed = fp4_q_scales = fp4_k_scales = fp4_v_scales = fp4_q_pts = fp4_k_pts = fp4_v_pts = None

        q_out = q_k_v_gemm[0]
        k_out = q_k_v_gemm[1]
        v_out = q_k_v_gemm[2];  q_k_v_gemm = None

        mul: "f32[4, 64]" = q_out * k_out;  q_out = k_out = None
        add: "f32[4, 64]" = mul + v_out;  mul = v_out = None

        fp4_o_packed: "u8[64, 32]" = self.fp4_o_packed
        fp4_o_scales: "u8[64, 4]" = self.fp4_o_scales
        fp4_o_pts: "f32[]" = self.fp4_o_pts

        o_gemm = torch.ops.fp4.gemm_a16.default(add, [fp4_o_packed], [fp4_o_scales], [fp4_o_pts], [None], [4.649636321119033e-05]);  add = fp4_o_packed = fp4_o_scales = fp4_o_pts = None

        o_out = o_gemm[0];  o_gemm = None

        h: "f32[4, 64]" = l_x_ + o_out;  l_x_ = o_out = None

        fp4_gate_packed: "u8[128, 32]" = self.fp4_gate_packed
        fp4_gate_scales: "u8[128, 4]" = self.fp4_gate_scales
        fp4_gate_pts: "f32[]" = self.fp4_gate_pts
        fp4_up_packed: "u8[128, 32]" = self.fp4_up_packed
        fp4_up_scales: "u8[128, 4]" = self.fp4_up_scales
        fp4_up_pts: "f32[]" = self.fp4_up_pts

        gate_up_gemm = torch.ops.fp4.gemm_a16.default(h, [fp4_gate_packed, fp4_up_packed], [fp4_gate_scales, fp4_up_scales], [fp4_gate_pts, fp4_up_pts], [None, None], [4.650107439374551e-05, 4.649884067475796e-05]);  fp4_gate_packed = fp4_up_packed = fp4_gate_scales = fp4_up_scales = fp4_gate_pts = fp4_up_pts = None

        gate_out = gate_up_gemm[0]
        up_out = gate_up_gemm[1];  gate_up_gemm = None

        relu: "f32[4, 128]" = torch.relu(gate_out);  gate_out = None
        mul_1: "f32[4, 128]" = relu * up_out;  relu = up_out = None

        fp4_down_packed: "u8[64, 64]" = self.fp4_down_packed
        fp4_down_scales: "u8[64, 8]" = self.fp4_down_scales
        fp4_down_pts: "f32[]" = self.fp4_down_pts

        down_gemm = torch.ops.fp4.gemm_a16.default(mul_1, [fp4_down_packed], [fp4_down_scales], [fp4_down_pts], [None], [3.2880972867133096e-05]);  mul_1 = fp4_down_packed = fp4_down_scales = fp4_down_pts = None

        down_out = down_gemm[0];  down_gemm = None

        add_2: "f32[4, 64]" = h + down_out;  h = down_out = None
        return (add_2,)
""")

    def test_gpt2_conv1d_addmm_with_kn_weight(self):
        graph, report, _ = rewrite(Conv1D(), torch.randn(2, 3, 32))
        self.assertEqual(report.rewritten[0].shape, (48, 32))
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_parameters_bias_: "f32[48]", L_x_: "f32[2, 3, 32]", L_self_parameters_weight_: "f32[32, 48]"):
        l_self_parameters_bias_ = L_self_parameters_bias_
        l_x_ = L_x_
        l_self_parameters_weight_ = L_self_parameters_weight_

        view: "f32[6, 32]" = l_x_.view(-1, 32);  l_x_ = None

        fp4_weight_packed: "u8[48, 16]" = self.fp4_weight_packed
        fp4_weight_scales: "u8[48, 2]" = self.fp4_weight_scales
        fp4_weight_pts: "f32[]" = self.fp4_weight_pts

        weight_gemm = torch.ops.fp4.gemm.default(view, None, [fp4_weight_packed], [fp4_weight_scales], [fp4_weight_pts], [l_self_parameters_bias_]);  view = fp4_weight_packed = fp4_weight_scales = fp4_weight_pts = l_self_parameters_bias_ = None

        weight_out = weight_gemm[0];  weight_gemm = None

        view_1: "f32[2, 3, 48]" = weight_out.view(2, 3, -1);  weight_out = None
        return (view_1,)
""")

    def test_skipped_layer_k30(self):
        graph, report, _ = rewrite(One(k=30), torch.randn(4, 30))
        self.assertEqual(report.skipped[0].reason, "K=30 is not a multiple of 16")
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_fc_parameters_weight_: "f32[32, 30]", L_x_: "f32[4, 30]"):
        l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
        l_x_ = L_x_

        linear: "f32[4, 32]" = torch._C._nn.linear(l_x_, l_self_modules_fc_parameters_weight_, None);  l_x_ = l_self_modules_fc_parameters_weight_ = None
        return (linear,)
""")

    def test_weight_only_scheme(self):
        graph, _, _ = rewrite(One(bias=True), torch.randn(4, 64), scheme="nvfp4a16")
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_fc_parameters_weight_: "f32[32, 64]", L_self_modules_fc_parameters_bias_: "f32[32]", L_x_: "f32[4, 64]"):
        l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
        l_self_modules_fc_parameters_bias_ = L_self_modules_fc_parameters_bias_
        l_x_ = L_x_

        fp4_fc_packed: "u8[32, 32]" = self.fp4_fc_packed
        fp4_fc_scales: "u8[32, 4]" = self.fp4_fc_scales
        fp4_fc_pts: "f32[]" = self.fp4_fc_pts

        fc_gemm = torch.ops.fp4.gemm_a16.default(l_x_, [fp4_fc_packed], [fp4_fc_scales], [fp4_fc_pts], [l_self_modules_fc_parameters_bias_], [4.647961031878367e-05]);  l_x_ = fp4_fc_packed = fp4_fc_scales = fp4_fc_pts = l_self_modules_fc_parameters_bias_ = None

        fc_out = fc_gemm[0];  fc_gemm = None
        return (fc_out,)
""")

    def test_calibrated_layer_embeds_its_packed_buffers(self):
        linear = nn.Linear(64, 32)
        packed = fp4compile.NVFP4Linear.from_linear(linear, fp4compile.quantize(linear.weight.detach()))
        model = nn.Sequential(packed)
        graph, report, _ = rewrite(model, torch.randn(4, 64))
        self.assertEqual(report.rewritten[0].shape, (32, 64))
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_fn_modules_0_buffers_weight_packed_: "u8[32, 32]", L_fn_modules_0_buffers_weight_scales_: "u8[32, 4]", L_fn_modules_0_buffers_weight_global_scale_: "f32[]", L_fn_modules_0_parameters_bias_: "f32[32]", L_args_0_: "f32[4, 64]"):
        l_fn_modules_0_buffers_weight_packed_ = L_fn_modules_0_buffers_weight_packed_
        l_fn_modules_0_buffers_weight_scales_ = L_fn_modules_0_buffers_weight_scales_
        l_fn_modules_0_buffers_weight_global_scale_ = L_fn_modules_0_buffers_weight_global_scale_
        l_fn_modules_0_parameters_bias_ = L_fn_modules_0_parameters_bias_
        l_args_0_ = L_args_0_

        fp4_0_packed: "u8[32, 32]" = self.fp4_0_packed
        fp4_0_scales: "u8[32, 4]" = self.fp4_0_scales
        fp4_0_pts: "f32[]" = self.fp4_0_pts

        _0_gemm = torch.ops.fp4.gemm.default(l_args_0_, None, [fp4_0_packed], [fp4_0_scales], [fp4_0_pts], [l_fn_modules_0_parameters_bias_]);  l_args_0_ = fp4_0_packed = fp4_0_scales = fp4_0_pts = l_fn_modules_0_parameters_bias_ = None

        _0_out = _0_gemm[0];  _0_gemm = None
        return (_0_out,)
""")

    def test_static_activation_scale_gives_the_gemm_its_alpha(self):
        """With a static activation scale, the GEMM's alpha (activation scale x weight scale, in fp32) is known when
        the graph is rewritten, and the GEMM gets it as a host float (cuBLAS's alpha in the large-M plan)."""
        linear = nn.Linear(64, 32, bias=False)
        packed = fp4compile.NVFP4Linear.from_linear(linear, fp4compile.quantize(linear.weight.detach(), 0.5),
                                                    input_global_scale=torch.tensor(0.002))
        graph, _, _ = rewrite(nn.Sequential(packed), torch.randn(4, 64))
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_fn_modules_0_buffers_weight_packed_: "u8[32, 32]", L_fn_modules_0_buffers_weight_scales_: "u8[32, 4]", L_fn_modules_0_buffers_weight_global_scale_: "f32[]", L_fn_modules_0_buffers_input_global_scale_: "f32[]", L_args_0_: "f32[4, 64]"):
        l_fn_modules_0_buffers_weight_packed_ = L_fn_modules_0_buffers_weight_packed_
        l_fn_modules_0_buffers_weight_scales_ = L_fn_modules_0_buffers_weight_scales_
        l_fn_modules_0_buffers_weight_global_scale_ = L_fn_modules_0_buffers_weight_global_scale_
        l_fn_modules_0_buffers_input_global_scale_ = L_fn_modules_0_buffers_input_global_scale_
        l_args_0_ = L_args_0_

        fp4_0_packed: "u8[32, 32]" = self.fp4_0_packed
        fp4_0_scales: "u8[32, 4]" = self.fp4_0_scales
        fp4_0_pts: "f32[]" = self.fp4_0_pts
        fp4_0_act_pts: "f32[]" = self.fp4_0_act_pts

        _0_gemm = torch.ops.fp4.gemm.default(l_args_0_, fp4_0_act_pts, [fp4_0_packed], [fp4_0_scales], [fp4_0_pts], [None], [0.0010000000474974513]);  l_args_0_ = fp4_0_act_pts = fp4_0_packed = fp4_0_scales = fp4_0_pts = None

        _0_out = _0_gemm[0];  _0_gemm = None
        return (_0_out,)
""")


class Forms(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64))
        self.register_buffer("b", torch.randn(32, 64))

    def forward(self, x):
        return (x @ self.w.t() + torch.mm(x, self.w.T) + torch.matmul(x, self.b.transpose(0, 1))
                + torch.mm(x, self.b.permute(1, 0)) + x.matmul(self.w.transpose(-1, -2)))


class NotLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64))
        self.bias = nn.Parameter(torch.randn(32))

    def forward(self, x, y):
        scores = x.unsqueeze(0) @ x.unsqueeze(0).transpose(-1, -2)  # attention-like: no stored weight
        computed = x @ (self.w * 2).t()  # a weight computed at run time
        scaled = torch.addmm(self.bias, x, self.w.t(), alpha=0.5)
        return scores.sum() + computed.sum() + scaled.sum() + (x @ y).sum()


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.body = nn.Embedding(64, 32), nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        return self.lm_head(self.body(self.embed(tokens)))


class CacheWrite(nn.Module):
    """A static KV cache: an in-place write whose result nobody reads must survive the pass."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.register_buffer("cache", torch.zeros(8, 32))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, self.proj(x))
        return self.cache.sum(0)


class TestMatching(TestCase):
    def test_every_transpose_spelling_and_buffers_match(self):
        _, report, _ = rewrite(Forms(), torch.randn(4, 64))
        self.assertEqual([d.op for d in report.rewritten], ["matmul", "mm", "matmul", "mm", "matmul"])
        self.assertEqual(report.skipped, [])

    def test_runtime_weights_attention_and_scaled_addmm_are_not_rewritten(self):
        graph, report, _ = rewrite(NotLinear(), torch.randn(4, 64), torch.randn(64, 8))
        self.assertEqual(report.rewritten, [])
        self.assertEqual(
            [d.reason for d in report.skipped],
            ["weight is computed at run time, not a parameter", "addmm with alpha or beta other than 1",
             "weight is computed at run time, not a parameter"],
        )
        self.assertNotIn("fp4.", graph)

    def test_tied_lm_head_stays_high_precision_whatever_its_name(self):
        _, report, _ = rewrite(TiedHead(), torch.randint(0, 64, (2, 5)), skip=())
        self.assertEqual([d.name for d in report.rewritten], ["body"])
        self.assertIn("shared with an embedding", report.skipped[0].reason)

    def test_in_place_writes_with_unused_results_are_kept(self):
        graph, report, _ = rewrite(CacheWrite(), torch.randn(2, 32), torch.tensor([1, 3]))
        self.assertEqual(len(report.rewritten), 1)
        self.assertIn("index_copy_", graph)

    def test_skip_patterns_leave_layers_alone(self):
        _, report, _ = rewrite(QKV(), torch.randn(4, 32), skip=("k", "v*"))
        self.assertEqual([d.name for d in report.rewritten], ["q"])
        self.assertIn("skip pattern", report.skipped[0].reason)

    def test_group_rules(self):
        """One launch per group of layers with one activation, scheme and K, all with a bias or none, each but the
        last with a multiple of GROUP_ALIGN outputs, at most MAX_GROUP; ``group=False`` keeps one GEMM each."""
        self.assertEqual(rewrite(QKV(), torch.randn(4, 32)).report.groups, [])  # q has 32 outputs, v a bias
        self.assertEqual(rewrite(Block(), torch.randn(4, 64), group=False).report.groups, [])

        class Wide(nn.Module):
            def __init__(self):
                super().__init__()
                self.fcs = nn.ModuleList(nn.Linear(32, n, bias=b) for n, b in
                                         ((64, True), (64, True), (64, True), (64, True), (16, True), (64, True),
                                          (64, False), (64, False)))

            def forward(self, x):
                return [fc(x) for fc in self.fcs]

        _, report, _ = rewrite(Wide(), torch.randn(4, 32))
        self.assertEqual(report.groups, [("fcs.0", "fcs.1", "fcs.2"), ("fcs.3", "fcs.4"), ("fcs.6", "fcs.7")])
        self.assertIn("nvfp4, group of 3", str(report))

    def test_unsupported_dtype_is_skipped_with_reason(self):
        model = One().double()
        _, report, _ = rewrite(model, torch.randn(4, 64, dtype=torch.double))
        self.assertIn("float64", report.skipped[0].reason)


def test_embedded_set_refreshes_only_what_changed():
    """The backend's per-call check: nothing changed -> no refresh; a packed buffer written in place needs none (the
    graph reads the buffer itself); a global scale written in place is refreshed once, not at every later call; a
    replaced buffer is copied into the graph's constant and from then on tracked by its version."""
    packed, scales, pts = torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8), torch.ones(())
    args = [torch.randn(3, 4), packed, scales, pts]
    embedded = [Embedded(t, t._version, i, [t], False, packed_buffer=t.dtype == torch.uint8)
                for i, t in enumerate(args[1:], start=1)]
    check = EmbeddedSet(embedded)
    assert not check.refresh(args, WEIGHT_CACHE)
    packed.add_(1)
    assert not check.refresh(args, WEIGHT_CACHE)
    pts.mul_(2)
    assert check.refresh(args, WEIGHT_CACHE) and not check.refresh(args, WEIGHT_CACHE)
    args[2] = torch.full((4, 1), 7, dtype=torch.uint8)
    assert check.refresh(args, WEIGHT_CACHE) and not check.refresh(args, WEIGHT_CACHE)
    assert embedded[1].constants[0] is scales and scales.eq(7).all()
    args[2].add_(1)
    assert check.refresh(args, WEIGHT_CACHE) and scales.eq(8).all()


if __name__ == "__main__":
    run_tests()
