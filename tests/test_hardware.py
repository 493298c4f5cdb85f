"""What the host record says about the processor: generations that share a brand name stay apart."""
from __future__ import annotations

from quill.hardware import parse_cpuinfo

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 fma avx_vnni avx512f avx512_vnni avx512_bf16

processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 fma avx_vnni avx512f avx512_vnni avx512_bf16
"""

SAPPHIRE_RAPIDS = """processor\t: 0
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_family_and_model_numbers_tell_same_named_cpus_apart():
    info = parse_cpuinfo(ZEN5)
    assert (info["model"], info["generation"]) == ("AMD EPYC", "family 26 model 2")
    assert info["flags"] == ["avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert not info["amx"]
    intel = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert intel["generation"] == "family 6 model 143" and intel["amx"]


def test_an_unreadable_cpuinfo_falls_back_to_the_platform_name():
    assert parse_cpuinfo("", "x86_64") == {"model": "x86_64", "generation": "", "flags": [], "amx": False}
