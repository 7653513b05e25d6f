import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "sample_data"

# Without a GPU the Triton kernels run in Triton's interpreter; the flag must be set before triton is imported by
# any test module, so it is set here, once, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def own_folder(tmp_path, monkeypatch):
    """Every test runs in a folder of its own: the scripts' relative defaults (out/pretrain/encoder.safetensors,
    out/<stage>) then never reach the user's out/ in the project root, whatever they ran before the tests."""
    monkeypatch.chdir(tmp_path)


def _out_state():
    out = ROOT / "out"
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")) if out.exists() else None


def pytest_sessionstart(session):
    session.config._out_before = _out_state()


def pytest_sessionfinish(session, exitstatus):
    """Tests never read or write the user's out/: a session that changed it fails, naming the change."""
    before, after = session.config._out_before, _out_state()
    if before != after:
        changed = sorted(set(map(tuple, after or [])) ^ set(map(tuple, before or [])))[:3]
        print(f"\nFAILED: the tests changed the project's out/ folder: {changed}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
