"""The "auto" defaults: which CPU split and matmul inputs a machine gets, and that explicit values win."""
import dataclasses

from transformer import platform
from transformer.config import Config, MeshConfig, ModelConfig


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert platform.cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert platform.cpu_flags(str(tmp_path / "missing")) == set()


def test_bf16_comes_with_native_bf16_only_and_auto_never_splits_the_host():
    assert platform.auto_matmul_dtype("cpu", bf16_cpu=True) == "bfloat16"
    assert platform.auto_matmul_dtype("cpu", bf16_cpu=False) == "float32"
    assert platform.auto_matmul_dtype("gpu", bf16_cpu=True) == "float32"  # model.dtype decides on accelerators
    assert platform.auto_cpu_devices() == 0  # the split's all-reduce can hang: opt-in only


def test_resolve_decides_auto_fields_and_keeps_explicit_ones(monkeypatch):
    monkeypatch.setattr(platform, "cpu_has_bf16", lambda: True)
    auto = platform.resolve(Config())
    assert auto.model.matmul_dtype == "bfloat16" and auto.mesh.cpu_devices == 0
    explicit = Config(model=ModelConfig(matmul_dtype="float32"), mesh=MeshConfig(cpu_devices=0))
    assert platform.resolve(explicit) == explicit
    monkeypatch.setattr(platform, "cpu_has_bf16", lambda: False)
    assert platform.resolve(dataclasses.replace(Config())).model.matmul_dtype == "float32"
