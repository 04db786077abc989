"""The dtype the service picks when BLIP2_DTYPE is unset."""

import pytest

from blip2 import model
from blip2.config import Settings

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"  # avx512, but bf16 only emulated
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize(("text", "native"), [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE, False), (ARM, False), ("", False)])
def test_native_bf16_is_read_from_cpu_flags(text, native):
    assert model.cpu_has_native_bf16(text) is native


def test_flag_names_must_match_whole_words():
    assert not model.cpu_has_native_bf16("flags\t: avx512_bf16x not_amx_bf16\n")


@pytest.mark.parametrize(("native", "cpu_dtype"), [(True, "bfloat16"), (False, "float32")])
def test_default_dtype_per_device(monkeypatch, native, cpu_dtype):
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert model.default_dtype_name("cpu") == cpu_dtype
    assert model.default_dtype_name("cuda") == "float16"


def test_blip2_dtype_overrides_the_default(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    _, dtype = model.pick_device_and_dtype(Settings.from_env({"BLIP2_DEVICE": "cpu", "BLIP2_DTYPE": "float32"}))
    assert dtype == torch.float32
    _, dtype = model.pick_device_and_dtype(Settings.from_env({"BLIP2_DEVICE": "cpu"}))
    assert dtype == torch.bfloat16
