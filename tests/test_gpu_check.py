"""bench/gpu_check.py on a machine without a GPU: every part it runs is recorded with its status
and reason (never passed silently), the report is written, and the exit code says a part failed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_records_each_part_and_fails_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--parts", "env,learner", "--out", str(out),
                          "--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "no-wheels")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert list(report["parts"]) == ["env", "learner"] and report["installed"] == {}
    env, learner = report["parts"]["env"], report["parts"]["learner"]
    assert env["status"] == "failed" and "sees no CUDA device" in env["reason"]
    assert learner["status"] == "failed" and learner["reason"] and "traceback" in learner
    assert "gpu_check: env: failed" in res.stdout
