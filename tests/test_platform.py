"""The "auto" defaults: which CPU split and matmul inputs a machine gets, and that explicit values win."""
import dataclasses

from transformer import platform
from transformer.config import Config, MeshConfig, ModelConfig


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert platform.cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert platform.cpu_flags(str(tmp_path / "missing")) == set()


def test_the_split_and_bf16_come_with_native_bf16_only(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert platform.auto_cpu_devices(12, cores=2, bf16_cpu=True) == 2
    assert platform.auto_cpu_devices(12, cores=1, bf16_cpu=True) == 1  # one core: nothing to split
    assert platform.auto_cpu_devices(7, cores=2, bf16_cpu=True) == 1  # the batch must divide
    assert platform.auto_cpu_devices(12, cores=2, bf16_cpu=False) == 0  # AVX2 only: one device was faster
    assert platform.auto_matmul_dtype("cpu", bf16_cpu=True) == "bfloat16"
    assert platform.auto_matmul_dtype("cpu", bf16_cpu=False) == "float32"
    assert platform.auto_matmul_dtype("gpu", bf16_cpu=True) == "float32"  # model.dtype decides on accelerators
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert platform.auto_cpu_devices(12, cores=2, bf16_cpu=True) == 0  # the CPU is not where the run goes


def test_resolve_decides_auto_fields_and_keeps_explicit_ones(monkeypatch):
    monkeypatch.setattr(platform, "cpu_has_bf16", lambda: True)
    auto = platform.resolve(Config())
    assert auto.model.matmul_dtype == "bfloat16" and auto.mesh.cpu_devices in (1, 2)
    explicit = Config(model=ModelConfig(matmul_dtype="float32"), mesh=MeshConfig(cpu_devices=0))
    assert platform.resolve(explicit) == explicit
    monkeypatch.setattr(platform, "cpu_has_bf16", lambda: False)
    assert platform.resolve(dataclasses.replace(Config())).model.matmul_dtype == "float32"
