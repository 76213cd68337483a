"""The main job runs end to end at a tiny size and reports what it promises."""

from fp4compile import demo


def test_demo_prints_layers_error_and_times(capsys):
    demo.main(["--layers", "1", "--dim", "64", "--tokens", "8"])
    out = capsys.readouterr().out
    assert "fp4: 7 layer(s) rewritten, 1 left in high precision" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("fp4 ")}
    assert set(rows) == {"nvfp4a16", "nvfp4"}
    for scheme, cols in rows.items():
        error = float(cols[2])
        assert 0.01 < error < 0.5, f"{scheme}: relative error {error} against bf16"
    assert "torch.compile default" in out
