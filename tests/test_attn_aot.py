"""The Triton attention kernels compile ahead of time for NVIDIA sm_80 (A100) and sm_90 (H100), on this CPU machine:
triton.compile with GPUTarget("cuda", cc, 32) runs Triton's whole lowering and the ptxas that ships with triton,
giving PTX and a cubin, as the first launch on such a GPU would.

Each compile takes several seconds of one CPU core, so CI compiles a representative subset: every kernel, with
both GPU generations, both 16-bit dtypes and all three head dims (64 / 80 / 128) covered across them, each at the
first config the autotuner keeps there. `python triton_attn/aot_report.py` compiles every config of every kernel in
every combination (the full sweep, with registers / spills / shared memory per config).

The compiles run in a subprocess: this test session runs Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported), and triton's own library functions are then interpreter objects that cannot be lowered."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton")
from triton_attn import aot_report  # noqa: E402

# (arch, dtype, head dim) per kernel: every kernel, both archs, both dtypes and all three head dims each appear;
# five compiles (about 30 s on two idle cores), the full sweep is the script's
SUBSET = {
    "_attn_fwd": [(90, "bf16", 128), (80, "fp16", 64)],
    "_attn_bwd_dkdv": [(80, "bf16", 80)],
    "_attn_bwd_dq": [(90, "fp16", 128)],
    "_attn_bwd_preprocess": [(80, "fp16", 128)],
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    combos = [f"{k}:{a}:{d}:{h}" for k, cs in SUBSET.items() for a, d, h in cs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "triton_attn" / "aot_report.py"), "--combo", *combos, "--workers", "2",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_every_kernel_compiles_for_sm80_and_sm90(rows):
    rows, _ = rows
    got = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"]) for r in rows}
    assert got == {(k, *c) for k, cs in SUBSET.items() for c in cs}
    for r in rows:
        assert r["target"] == ("sm_90a" if r["arch"] == 90 else "sm_80") and r["entry"], r
        assert r["elf"] and r["cubin_bytes"] > 4096  # a real device binary from ptxas
        assert 0 < r["regs"] <= 255 and r["fits"], r
        if r["dtype"] == "bf16" and r["kernel"] != "_attn_bwd_preprocess":
            assert r["bf16_ops"]  # bf16 operands reach the matrix instructions, not an fp32 emulation


def test_kept_configs_do_not_spill(rows):
    # the config the autotuner keeps does not spill, unless every config of that kernel spills there: then it is
    # the one that spills least, and attention.SPILLS records it
    rows, _ = rows
    mod = aot_report.load_attention()
    for r in rows:
        spills = mod.SPILLS.get((r["kernel"], r["arch"]), {})
        assert r["spill_stores"] == 0 or aot_report.config_key(r)[1:] in spills, r


def test_report_table_and_drop_list(rows):
    _, out = rows
    assert "| kernel | arch | dtype | head_dim |" in out and "Configs to drop" in out
