"""The kernel bench's markdown table (libortho.eval.bench_kernels.summary): every row has the header's cells."""
import pytest

from libortho.eval.bench_kernels import summary


def row(m, density, variant=False):
    r = {"N": 64, "K": 128, "M": m, "density": density, "bf16_us": 10.0, "torch_int4_us": 5.0, "base_only_us": 4.0,
         "alpha0_us": 4.0, "alpha1_us": 5.0 + 10 * density}
    if variant:
        r.update(alpha0_v1_us=4.0, alpha1_v1_us=5.0)
    return r


@pytest.mark.parametrize("variant", [False, True])
def test_rows_have_the_headers_cells(variant):
    rows = [row(m, d, variant and m == 1) for m in (1, 512) for d in (0.0, 0.01, 0.05)]
    lines = summary({"rows": rows}).splitlines()
    cells = [line.count("|") for line in lines]
    assert len(lines) == 4 and len(set(cells)) == 1, lines
    assert cells[0] == (11 if variant else 9)
    assert "| 64x128 | 1 | 10.0 | 2.00x | 2.50x | 1.96x | 1.82x | 2.50x |" in lines[2]
    assert lines[3].endswith("| 2.50x |" if not variant else "| - | - |")
