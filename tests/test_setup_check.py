"""scripts/installed.py: setup.sh skips pip only when every requirement is installed at a good version."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "installed.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.strip()


def test_everything_present_passes_and_follows_includes(tmp_path):
    (tmp_path / "base.txt").write_text("# a comment\ntorch>=2.1  # trailing comment\n\nnumpy\n")
    (tmp_path / "test.txt").write_text("-r base.txt\npytest\n")
    assert installed("-r", str(tmp_path / "test.txt"), "packaging") == (0, "")
    assert installed("-r", "requirements-test.txt") == (0, "")


def test_a_missing_or_too_old_package_sends_setup_to_pip(tmp_path):
    (tmp_path / "base.txt").write_text("numpy\nno-such-package-here>=1\n")
    (tmp_path / "test.txt").write_text("-r base.txt\n")
    assert installed("-r", str(tmp_path / "test.txt")) == (1, "to install: no-such-package-here>=1 (not installed)")
    code, out = installed("torch>=999")
    assert code == 1 and out.startswith("to install: torch>=999 (installed: ")
    assert installed("not a requirement !!") == (1, "to install: not a requirement !!")
