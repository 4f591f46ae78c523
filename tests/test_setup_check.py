"""scripts/installed.py: setup.sh skips pip only when every requirement is installed at a good version.

Only packages that must be present wherever this test runs are named as installed (pytest runs it, and
installed.py itself imports packaging), so the test checks the script, not what the host has installed."""
import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYTEST = metadata.version("pytest")


def installed(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "installed.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.strip()


def test_everything_present_passes_and_follows_includes(tmp_path):
    (tmp_path / "base.txt").write_text(f"# a comment\npytest>={PYTEST}  # trailing comment\n\npackaging\n")
    (tmp_path / "test.txt").write_text("-r base.txt\npytest\n")
    assert installed("-r", str(tmp_path / "test.txt"), "packaging") == (0, "")


def test_a_missing_or_too_old_package_sends_setup_to_pip(tmp_path):
    (tmp_path / "base.txt").write_text("pytest\nno-such-package-here>=1\n")
    (tmp_path / "test.txt").write_text("-r base.txt\n")
    assert installed("-r", str(tmp_path / "test.txt")) == (1, "to install: no-such-package-here>=1 (not installed)")
    assert installed("pytest>=999") == (1, f"to install: pytest>=999 (installed: {PYTEST})")
    assert installed("not a requirement !!") == (1, "to install: not a requirement !!")


def test_the_projects_requirement_files_are_read_whole():
    """Every line of requirements-test.txt (and the requirements.txt it includes) is a requirement the
    script understands: none would be handed to pip unread."""
    spec = importlib.util.spec_from_file_location("installed", ROOT / "scripts" / "installed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = [Requirement(line).name for line in script.requirement_lines(ROOT / "requirements-test.txt")]
    assert {"torch", "transformers", "pytest", "ruff"} <= set(names)
