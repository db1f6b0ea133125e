"""What the CPU offers the sampler's fast paths, as oneDNN will actually use it.

The CPU differs from machine to machine (a Xeon with AMX, an AMD EPYC with AVX-512 BF16, one with AVX2 only),
and each fast path must probe for what it needs and fall back where it is missing. oneDNN's own cap on the
instruction set, ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``), is honoured here as well,
so that one machine can run everything as a lesser CPU would:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 pytest -q

runs the suite with oneDNN limited to AVX2 (no bf16 or AMX kernels: the packed-linear probe then refuses
bf16) and ATen's own kernels on their AVX2 variants (another summation order), as on an AVX2-only CPU.
"""

from __future__ import annotations

import os

import torch

# oneDNN's ISA names, lowest to highest (its docs: "CPU ISA hints"); a cap admits its name and those below it.
_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
              "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
              "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16")


def onednn_isa_cap() -> str | None:
    """The instruction-set cap set for oneDNN in the environment, upper-cased; None when uncapped."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if not cap or cap.strip().upper() in ("ALL", "DEFAULT"):
        return None
    return cap.strip().upper()


def _cap_admits(isa: str) -> bool:
    cap = onednn_isa_cap()
    if cap is None:
        return True
    if cap not in _ISA_ORDER:
        return False  # an unknown cap: assume the least, the fallback is always correct
    return _ISA_ORDER.index(cap) >= _ISA_ORDER.index(isa)


def has_amx() -> bool:
    """AMX tiles present on the CPU and admitted by oneDNN's ISA cap."""
    present = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(present) and _cap_admits("AVX512_CORE_AMX")
