"""CTranslate2 runs its AVX512 kernels on every CPU that has them, not only on Intel's, and an
operator's own ``CT2_FORCE_CPU_ISA`` wins. Each case loads the engine in a fresh process, because
CTranslate2 reads the choice once per process, and reads the choice from CTranslate2's own log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from speech.engines.ctranslate2 import _AVX512_FLAGS, _prefer_avx512

ROOT = Path(__file__).resolve().parents[2]
LOAD = "from speech.engines.ctranslate2 import CTranslate2Engine; CTranslate2Engine(model_name='base').load()"


def has_avx512() -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}
    return _AVX512_FLAGS <= flags


def selected_isa(**env: str) -> str:
    child_env = {k: v for k, v in os.environ.items() if k != "CT2_FORCE_CPU_ISA"} | env | {"CT2_VERBOSE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD], cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "Selected ISA:" in line]
    assert lines, done.stderr[-2000:]
    return lines[0].rsplit(":", 1)[1].strip()


@pytest.mark.slow
def test_the_engine_uses_avx512_where_the_cpu_has_it() -> None:
    isa = selected_isa()
    if has_avx512():
        assert isa == "AVX512"
    else:
        assert isa != "AVX512"


@pytest.mark.slow
def test_an_operators_own_choice_of_isa_is_kept() -> None:
    assert selected_isa(CT2_FORCE_CPU_ISA="AVX2") == "AVX2"


def test_a_cpu_without_every_avx512_extension_is_left_to_ctranslate2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CT2_FORCE_CPU_ISA", "")  # so that the test's own change is undone after it
    monkeypatch.delenv("CT2_FORCE_CPU_ISA")
    cpuinfo = tmp_path / "cpuinfo"
    # AVX512 F without BW/DQ/VL (Knights Landing): CTranslate2 would refuse AVX512 there.
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 avx512f avx512cd\n")
    _prefer_avx512(cpuinfo)
    assert "CT2_FORCE_CPU_ISA" not in os.environ
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512cd avx512vl avx512bw avx512dq\n")
    _prefer_avx512(cpuinfo)
    assert os.environ["CT2_FORCE_CPU_ISA"] == "AVX512"
