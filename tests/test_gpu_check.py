import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_passes_in_its_cpu_form():
    """benchmarks/gpu_check.py at CI size on the CPU: both shapes measured, resume, SIGTERM and 2-process DDP pass."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                             "--steps", "2"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    shapes = [json.loads(line) for line in lines if line.startswith("{")]
    assert [s["shape"] for s in shapes] == ["bert-paper", "small"] and all(s["ms_per_step"] > 0 for s in shapes)
    assert {line.split()[1] for line in lines if line.startswith("ok")} == {"resume_equal", "sigterm_saves", "ddp"}
