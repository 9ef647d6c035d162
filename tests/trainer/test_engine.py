"""What ``model.precision: auto`` picks on a CPU, from given capability flags."""

from pathlib import Path

import pytest
import torch

from evotune.trainer.engine import cpu_capabilities, cpu_precision


def test_x86_with_native_bf16_trains_in_bf16():
    amx = {"architecture": "x86_64", "amx_bf16": True, "avx512_bf16": True}
    precision, why = cpu_precision(amx)
    assert precision == "bf16" and "AMX-BF16, AVX512-BF16" in why
    # an AMD EPYC with AVX512-BF16 and no AMX (this development machine)
    precision, why = cpu_precision({"architecture": "x86_64", "amx_bf16": False,
                                    "avx512_bf16": True})
    assert precision == "bf16" and "AVX512-BF16" in why and "AMX" not in why
    # Windows names the architecture AMD64
    assert cpu_precision({"architecture": "AMD64", "amx_bf16": True})[0] == "bf16"


def test_x86_without_native_bf16_trains_in_fp32():
    # AVX-512 without its BF16 extension (e.g. Skylake-X): bf16 would be widened per product
    precision, why = cpu_precision({"architecture": "x86_64", "avx512_f": True,
                                    "avx512_bf16": False, "amx_bf16": False})
    assert precision == "fp32" and "no native bf16" in why
    assert cpu_precision({"architecture": "x86_64"})[0] == "fp32"


def test_other_architectures_train_in_fp32():
    # an ARM CPU with bf16 instructions still gets fp32: only x86's bf16 paths are measured
    precision, why = cpu_precision({"architecture": "arm64", "bf16": True, "sve_bf16": True})
    assert precision == "fp32" and "arm64" in why
    assert cpu_precision({})[0] == "fp32"


def test_this_cpus_capabilities_name_an_architecture():
    caps = cpu_capabilities()
    assert isinstance(caps.get("architecture"), str) and caps["architecture"]
    assert cpu_precision(caps)[0] in ("bf16", "fp32")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo")
def test_without_torchs_query_the_kernels_flags_give_the_same_answer(monkeypatch):
    """A torch without ``torch.cpu.get_capabilities``: the architecture and bf16 flags come
    from ``platform`` and /proc/cpuinfo, and agree with what torch's cpuinfo reports."""
    torch_caps = dict(torch.cpu.get_capabilities())
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    caps = cpu_capabilities()
    assert caps["architecture"] == torch_caps["architecture"].lower()
    for flag in ("amx_bf16", "avx512_bf16"):
        assert bool(caps.get(flag)) == bool(torch_caps.get(flag)), flag
    assert cpu_precision(caps) == cpu_precision(torch_caps)
