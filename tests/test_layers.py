"""The layering of DESIGN.md holds: imports only point down, and the job scripts use public entry points."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_layers_contract_is_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raynoisy layers KEPT" in result.stdout


def test_job_scripts_import_only_public_names():
    for script in sorted((ROOT / "jobs").glob("*.py")):
        tree = ast.parse(script.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raynoisy"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{script.name} imports private {private} from {node.module}"
