"""A calibrated model under backend="fp4": its graph embeds exactly the GPTQ weights and computes its eager output.

Regenerate the snapshot after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/test_calibrated_graph.py``.
"""

import torch
from torch import nn
from torch.testing._internal.common_utils import TestCase, run_tests

import fp4compile
from rewritten import rewrite


def calibrated_stack(scheme: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    data = [torch.randn(8, 32) @ torch.randn(32, 32) * 0.3 for _ in range(4)]
    fp4compile.calibrate(model, data, scheme=scheme, progress=False)
    return model


class TestCalibratedGraph(TestCase):
    def test_graph_constants_are_the_gptq_weights(self):
        model = calibrated_stack("nvfp4a16")
        graph, _, gm = rewrite(model, torch.randn(4, 32))
        for i in (0, 2):
            layer = model[i]
            self.assertIsInstance(layer, fp4compile.NVFP4Linear)
            self.assertTrue(torch.equal(getattr(gm, f"fp4_{i}_packed"), layer.weight_packed))
            self.assertTrue(torch.equal(getattr(gm, f"fp4_{i}_scales"), layer.weight_scales))
            self.assertTrue(torch.equal(getattr(gm, f"fp4_{i}_pts"), layer.weight_global_scale))
        self.assertExpectedInline(graph, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_fn_modules_0_buffers_weight_packed_: "u8[48, 16]", L_fn_modules_0_buffers_weight_scales_: "u8[48, 2]", L_fn_modules_0_buffers_weight_global_scale_: "f32[]", L_fn_modules_0_parameters_bias_: "f32[48]", L_args_0_: "f32[4, 32]", L_fn_modules_2_buffers_weight_packed_: "u8[16, 24]", L_fn_modules_2_buffers_weight_scales_: "u8[16, 3]", L_fn_modules_2_buffers_weight_global_scale_: "f32[]", L_fn_modules_2_parameters_bias_: "f32[16]"):
        l_fn_modules_0_buffers_weight_packed_ = L_fn_modules_0_buffers_weight_packed_
        l_fn_modules_0_buffers_weight_scales_ = L_fn_modules_0_buffers_weight_scales_
        l_fn_modules_0_buffers_weight_global_scale_ = L_fn_modules_0_buffers_weight_global_scale_
        l_fn_modules_0_parameters_bias_ = L_fn_modules_0_parameters_bias_
        l_args_0_ = L_args_0_
        l_fn_modules_2_buffers_weight_packed_ = L_fn_modules_2_buffers_weight_packed_
        l_fn_modules_2_buffers_weight_scales_ = L_fn_modules_2_buffers_weight_scales_
        l_fn_modules_2_buffers_weight_global_scale_ = L_fn_modules_2_buffers_weight_global_scale_
        l_fn_modules_2_parameters_bias_ = L_fn_modules_2_parameters_bias_

        fp4_0_packed: "u8[48, 16]" = self.fp4_0_packed
        fp4_0_scales: "u8[48, 2]" = self.fp4_0_scales
        fp4_0_pts: "f32[]" = self.fp4_0_pts

        _0_gemm = torch.ops.fp4.gemm_a16.default(l_args_0_, [fp4_0_packed], [fp4_0_scales], [fp4_0_pts], [l_fn_modules_0_parameters_bias_], [6.575465522473678e-05]);  l_args_0_ = fp4_0_packed = fp4_0_scales = fp4_0_pts = l_fn_modules_0_parameters_bias_ = None

        _0_out = _0_gemm[0];  _0_gemm = None
        input_2: "f32[4, 48]" = torch.nn.functional.relu(_0_out, inplace = False);  _0_out = None
        fp4_2_packed: "u8[16, 24]" = self.fp4_2_packed
        fp4_2_scales: "u8[16, 3]" = self.fp4_2_scales
        fp4_2_pts: "f32[]" = self.fp4_2_pts

        _2_gemm = torch.ops.fp4.gemm_a16.default(input_2, [fp4_2_packed], [fp4_2_scales], [fp4_2_pts], [l_fn_modules_2_parameters_bias_], [5.3592215408571064e-05]);  input_2 = fp4_2_packed = fp4_2_scales = fp4_2_pts = l_fn_modules_2_parameters_bias_ = None

        _2_out = _2_gemm[0];  _2_gemm = None
        return (_2_out,)
""")

    def test_compiled_output_equals_the_calibrated_models_eager_output(self):
        for scheme in ("nvfp4", "nvfp4a16"):
            model = calibrated_stack(scheme)
            x = torch.randn(5, 32)
            torch._dynamo.reset()
            with torch.no_grad():
                torch.testing.assert_close(torch.compile(model, backend="fp4")(x), model(x), rtol=1e-5, atol=1e-6)


    def test_quantize_model_without_data_matches_the_backend_on_the_float_model(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).to(torch.bfloat16).eval()
        x = torch.randn(5, 32, dtype=torch.bfloat16)
        torch._dynamo.reset()
        with torch.no_grad():
            expect = torch.compile(model, backend="fp4")(x)
            bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            self.assertEqual(fp4compile.quantize_model(model), ["0", "2"])
            packed_bytes = sum(t.numel() * t.element_size() for t in model.buffers())
            self.assertLess(packed_bytes, 0.3 * bf16_bytes)
            torch._dynamo.reset()
            self.assertEqual(torch.compile(model, backend="fp4")(x), expect)


if __name__ == "__main__":
    run_tests()
