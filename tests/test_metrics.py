"""MFU's denominator: the peak table matches the names devices really report."""

import pytest

from mmjax.train import metrics


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("TPU v4", 275),
    ("TPU v5", 459),  # what a v5p reports
    ("TPU v5p", 459), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v6 lite", 918),
    ("NVIDIA A100-SXM4-80GB", 312)])
def test_table_peak_by_device_kind(kind, tflops):
  assert metrics.table_peak(kind) == tflops * 1e12


def test_unknown_devices_have_no_table_peak():
  assert metrics.table_peak("cpu") is None
  assert metrics.table_peak("Tesla T4") is None
