"""The examples under examples/ run as a user runs them, against the
installed pydr, and check their own results: a failed check is a non-zero
exit, which fails the test."""

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_the_orchestrator_example_runs_and_checks_itself(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "orchestrator.py"), str(work)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    checks = [line for line in r.stdout.splitlines() if line.startswith("check: ")]
    assert len(checks) >= 10 and all(line.endswith(": yes") for line in checks), r.stdout
