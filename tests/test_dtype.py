"""dtype "auto": bf16 where the hardware computes it natively, fp32 elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from prism_ray.engine.loading import computes_bf16_natively, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16,amx,expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_auto_on_cpu_follows_the_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_dtype("auto", CPU) is expected


def test_auto_on_cuda_is_bf16_when_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_explicit_dtypes_win_and_bad_names_are_named():
    assert resolve_dtype("float32", CPU) is torch.float32 and resolve_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16 or float16, not 'int8'"):
        resolve_dtype("int8", CPU)


def test_this_machine_reads_its_own_cpu_flags():
    """The probe agrees with what the kernel reports for this CPU (Linux only)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    expected = "avx512_bf16" in flags or "amx_tile" in flags
    assert computes_bf16_natively(CPU) == expected


def test_kernels_are_chosen_at_load_and_said(tiny_ckpt, qwen3_ckpt, caplog):
    from prism_ray.engine import load_model

    with caplog.at_level("INFO", logger="prism_ray"):
        hybrid = load_model(tiny_ckpt, dtype="float32")
    assert hybrid.kernels == {"linear": "torch", "attention": "sdpa", "gated_delta_rule": "prism", "causal_conv1d": "torch",
                              "pointwise": "eager"}
    assert "engine kernels on cpu (float32): linear = torch, attention = sdpa, gated_delta_rule = prism" in caplog.text
    assert load_model(qwen3_ckpt, dtype="float32").kernels == {"linear": "torch", "attention": "sdpa", "pointwise": "eager"}


def test_malloc_thresholds_are_raised_once_unless_turned_off():
    """Engines call this on CPU (see prism_ray/allocator.py); in a fresh process, as it is per process."""
    code = ("from prism_ray.allocator import tune_allocator; "
            "print(tune_allocator(), tune_allocator())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]  # glibc here; the second call is the cached first
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PRISM_RAY_MALLOC_TUNING": "0"})
    assert off.stdout.split() == ["False", "False"]


def test_a_router_gives_large_blocks_back():
    """The router fixes glibc's mmap threshold (prism_ray/allocator.py): after a 16 MiB body is freed, its
    memory leaves the process, also the second time (glibc's own threshold would have risen to 16 MiB)."""
    code = ("import sys; from prism_ray.allocator import return_large_blocks; on = sys.argv[1] == '1'\n"
            "ok = return_large_blocks() if on else False\n"
            "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
            "for _ in range(2):\n"
            "    body = bytes(16 << 20); small = [bytes(100) for _ in range(1000)]; del body\n"
            "base = rss(); body = b'x' * (16 << 20); body = body.decode(); del body; keep = [bytes(64)]\n"
            "print(ok, (rss() - base) // 1024)")
    on = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, check=True)
    ok, grown_mib = on.stdout.split()
    assert ok == "True" and int(grown_mib) < 4
