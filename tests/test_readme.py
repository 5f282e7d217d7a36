"""The README's Quickstart is what CI runs and what a newcomer types: keep it honest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- quickstart:(\w+) -->\n```bash\n(.*?)\n```", text, flags=re.S)
    return dict(blocks)


def test_quickstart_has_exactly_two_commands_that_install_cpu_torch_first() -> None:
    cmds = quickstart_commands()
    assert list(cmds) == ["run", "test"]
    for cmd in cmds.values():
        assert "\n" not in cmd.strip()
        install_torch = cmd.index("pip install torch==2.13.0")
        assert install_torch < cmd.index("pip install -e")  # nothing else may pull a CUDA torch first
    assert "disagg generate" in cmds["run"]
    assert cmds["test"].endswith("pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    # The same extraction .ci/run performs, run for real: it must find the README's command.
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\((awk .*README\.md)\)", script)
    assert awk, "the CI script no longer reads its command from README.md"
    found = subprocess.run(["bash", "-c", awk.group(1)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == quickstart_commands()["test"]


def test_pyproject_keeps_torch_open() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.5"' in pyproject and "torch==" not in pyproject
