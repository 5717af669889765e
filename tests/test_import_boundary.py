"""The math core stays torch-only: pipeline/diffusion and pipeline/models import no frameworks."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ["pipeline/diffusion", "pipeline/models"]
FORBIDDEN = {"ray", "prefect", "fsspec", "s3fs", "webdataset", "boto3", "botocore", "aiobotocore"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("pkg", CORE)
def test_core_sources_import_no_framework(pkg):
    files = sorted((ROOT / pkg).rglob("*.py"))
    assert files, f"no sources under {pkg}"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_importing_core_loads_no_framework_module():
    # Transitive check in a clean interpreter: importing every core module pulls in none of them.
    mods = [".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in CORE
            for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "__init__.py"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            + "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import ray\nfrom prefect import flow\n")
    assert _imports(f) & FORBIDDEN == {"ray", "prefect"}
