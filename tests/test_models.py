"""dtype resolution: 'auto' picks bf16 only where the hardware computes it natively."""

import pytest
import torch

from posttrain import models


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.resolve_dtype("auto") == expected
    assert models.resolve_dtype("auto", torch.device("cpu")) == expected
    assert models.parse_dtype("auto") == models.DTYPES[expected]


def test_explicit_dtypes_pass_through_unchanged(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("bf16") == "bf16"
    assert models.parse_dtype("fp16") == torch.float16
    assert models.parse_dtype(torch.bfloat16) == torch.bfloat16


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert models.cpu_has_native_bf16() is True
    fake.write_text("flags\t\t: fpu sse avx2\n")
    assert models.cpu_has_native_bf16() is False


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype 'int8'"):
        models.parse_dtype("int8")
