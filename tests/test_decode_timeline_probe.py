"""benchmarks/probes/decode_timeline.py: the per-step accounting of a profiled graph replay's kernels."""
import importlib.util
import random
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "decode_timeline", Path(__file__).resolve().parents[1] / "benchmarks" / "probes" / "decode_timeline.py")
decode_timeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode_timeline)


def test_kernel_names_fall_in_their_categories():
    cat = decode_timeline.category
    assert cat("void libortho::(anonymous namespace)::fused_small_m_kernel<V1Cfg<2, true>, 4, 1>(...)") == \
        "libortho linear"
    assert cat("void libortho::decode_attention_split<__nv_bfloat16, 128, 1>(AttnArgs)") == "attention"
    assert cat("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "cuBLAS"
    assert cat("triton_red_fused_add_mean_mul_pow_rsqrt_0") == "triton"
    assert cat("Memset (Device)") == "memcpy / memset"
    assert cat("something_else") == "other"


def test_gaps_overlaps_and_busy_time_per_step():
    # one replay: linear 0-10, triton 12-14 (gap 2), attention 13-20 (overlap -1), linear 21-30 (gap 1)
    step = [("fused_small_m_kernel", 0, 10), ("triton_poi_x", 12, 14), ("decode_attention_split", 13, 20),
            ("fused_small_m_kernel", 21, 30)]
    kernels = [(n, s + 100 * r, e + 100 * r) for r in range(3) for n, s, e in step]
    random.Random(0).shuffle(kernels)  # the profiler's order is not the timeline's
    t = decode_timeline.timeline(kernels, 3)
    assert t["kernels_per_step"] == 4 and t["span_us"] == 30
    assert t["busy_us"] == {"libortho linear": 19, "attention": 7, "triton": 2}
    assert t["busy_total_us"] == 28
    assert t["gaps_us"] == {"libortho linear -> triton": 2, "attention -> libortho linear": 1,
                            "triton -> attention": -1}
    assert t["gaps_per_step"] == {"libortho linear -> triton": 1, "attention -> libortho linear": 1,
                                  "triton -> attention": 1}
    assert t["gap_total_us"] == 2 and t["overlap_us"] == -1  # the 70 us between replays are not counted
    assert t["kernels_us"] == {"fused_small_m_kernel": {"us": 19, "per_step": 2},
                               "decode_attention_split": {"us": 7, "per_step": 1},
                               "triton_poi_x": {"us": 2, "per_step": 1}}


def test_device_kernels_reads_the_profilers_events():
    """The probe's reader of kineto events, on the CPU's (the GPU's kernels come through the same records)."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(64).sum()
    evs = decode_timeline.device_kernels(prof, torch.autograd.DeviceType.CPU)
    assert {"aten::ones", "aten::sum"} <= {n for n, _, _ in evs}
    assert all(0 <= e - s < 1e7 for _, s, e in evs)  # microseconds, ends after starts


@pytest.mark.parametrize("n,steps", [(7, 3), (0, 1), (4, 0)])
def test_kernels_that_do_not_split_into_the_replays_are_refused(n, steps):
    with pytest.raises(ValueError, match="do not split"):
        decode_timeline.timeline([("k", i, i + 1) for i in range(n)], steps)
