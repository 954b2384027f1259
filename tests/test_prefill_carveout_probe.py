"""benchmarks/probes/prefill_carveout.py: the column slices it dequantizes must be the layer's columns."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from libortho import OrthoLinear, quant

PROBES = Path(__file__).resolve().parents[1] / "benchmarks" / "probes"
sys.path.insert(0, str(PROBES))
spec = importlib.util.spec_from_file_location("prefill_carveout", PROBES / "prefill_carveout.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


@pytest.mark.parametrize("k,gs,parts", [(4096, 128, 2), (4096, 128, 4), (11008, 128, 4), (576, 128, 4),
                                        (256, 128, 3), (14336, 128, 3)])
def test_column_cuts_cover_the_columns_at_group_boundaries(k, gs, parts):
    c = probe.column_cuts(k, gs, parts)
    assert c[0][0] == 0 and c[-1][1] == k
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(c, c[1:]))
    assert all(lo % gs == 0 and lo < hi for lo, hi in c)
    assert len(c) == min(parts, -(-k // gs))


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_column_slices_of_a_layer_are_its_columns(parts, symmetric):
    torch.manual_seed(parts)
    n, k, gs = 40, 320, 64  # 5 groups, the last slice may be shorter than the others
    codes, grid = quant.quantize(torch.randn(n, k), 4, gs, symmetric)
    lay = OrthoLinear.pack(codes, grid, None, None, torch.float16)
    full = quant.dequantize_packed(lay.qweight, lay.scales, lay.zeros, 4, gs, n, k)
    cols = []
    for k0, k1 in probe.column_cuts(k, gs, parts):
        op = probe.column_operands(lay, k0, k1)
        assert op["K"] == k1 - k0 and op["N"] == n
        assert op["row_ptr"].numel() == n + 1 and int(op["row_ptr"].abs().sum()) == 0 and op["values"].numel() == 0
        assert op["qweight"].is_contiguous() and op["scales"].is_contiguous()
        cols.append(quant.dequantize_packed(op["qweight"], op["scales"], op["zeros"], 4, gs, n, k1 - k0))
    assert torch.equal(torch.cat(cols, dim=1), full)
