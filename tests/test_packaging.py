"""Packaging: `kernels/` lives only as `lora_fast.kernels`; transformers never mistakes it for HF's `kernels`."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora_fast

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_import_from_repo_root_takes_nothing_of_ours_as_bare_kernels():
    code = (
        "import sys, json, transformers.models.gpt2.modeling_gpt2\n"
        "from transformers.utils import import_utils as iu\n"
        "bare = {m: getattr(sys.modules[m], '__file__', None) for m in list(sys.modules)"
        " if m == 'kernels' or m.startswith('kernels.')}\n"
        "print(json.dumps({'bare': bare, 'hf_kernels': bool(getattr(iu, 'is_kernels_available', lambda: False)())}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Python puts the repo root on sys.path, so transformers may import kernels/__init__.py; it must find a version
    # too old for HF's package there (and not crash) and no kernel module may load under the bare name.
    ours = {m: f for m, f in result["bare"].items() if f and str(ROOT) in f}
    assert all(m == "kernels" for m in ours), f"kernel modules imported under the bare name: {ours}"
    assert result["hf_kernels"] is False


def test_kernels_init_has_no_imports_and_a_version_below_hf_kernels():
    """kernels/__init__.py imports nothing, and its __version__ is below every release of Hugging Face's kernels
    package (the oldest on PyPI is 0.0.1), so transformers' is_kernels_available finds it too old, on every
    version: transformers 5.0-5.8 raised InvalidVersion on a package without one."""
    from packaging.version import Version

    tree = ast.parse((ROOT / "kernels" / "__init__.py").read_text())
    versions = []
    for node in tree.body:
        assert not isinstance(node, (ast.Import, ast.ImportFrom)), "kernels/__init__.py must not import anything"
        names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if "__version__" in names:
            versions.append(ast.literal_eval(node.value))
    assert len(versions) == 1 and Version(versions[0]) < Version("0.0.1"), versions


def test_installed_as_lora_fast_kernels():
    import importlib

    mod = importlib.import_module("lora_fast.kernels")
    assert Path(mod.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert lora_fast.__version__


def test_wheel_ships_kernels_only_under_lora_fast(tmp_path):
    """Build the wheel and read its file list: no top-level `kernels` package may be installed."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lora_fast-*.whl")
    assert wheel.name.startswith(f"lora_fast-{lora_fast.__version__}-"), wheel.name  # one version: __init__.py's
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert "kernels" not in top, sorted(top)
    assert "lora_fast/kernels/__init__.py" in names
    assert {t for t in top if not t.endswith(".dist-info")} == {"lora_fast"}


def test_lora_fast_modules_import_kernels_by_full_name():
    for path in (ROOT / "lora_fast").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert node.module != "kernels" and not node.module.startswith("kernels."), f"{path}: {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("kernels"), f"{path}: import {alias.name}"


@pytest.mark.parametrize("marker", ["test-command", "test-command-transformers4"])
def test_ci_runs_the_readme_test_commands_verbatim(marker):
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(f"<!-- {marker} -->")
    assert readme[start + 1].startswith("```")
    command = readme[start + 2]
    assert "pytest" in command and not readme[start + 3].strip("`").strip()  # one line, then the closing fence
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines, f".ci/run does not run the README's {marker} {command!r}"
    for path in command.split("pytest -q", 1)[1].split():  # every test file named exists
        assert (ROOT / path).is_file(), path
