"""benchmarks/probes/write_rate.py: the bytes each variant is credited with (its rates rest on them)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "write_rate", Path(__file__).resolve().parents[1] / "benchmarks" / "probes" / "write_rate.py")
write_rate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(write_rate)


def test_traffic_counts_reads_and_writes_of_each_variant():
    n, k = 4096, 4096
    w = n * k * 2                       # bf16 W
    int4 = n * k // 2 + n * k // 128 * 4  # packed nibbles + bf16 scale and zero per group of 128
    t = write_rate.traffic(n, k, int4)
    assert t == {"dequant": int4 + w, "copy": 2 * w, "write_only": w, "expand_1_4": w + w // 4}
    # the expand stands in for the dequantize step's mix: within 2 % of its bytes, the same bytes written
    assert abs(t["expand_1_4"] / t["dequant"] - 1) < 0.02
