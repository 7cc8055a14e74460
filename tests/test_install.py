"""Packaging: setup.py's CUDA arch mapping, the sdist's completeness, and (where CI sets
GLM45_REQUIRE_INSTALLED=1) that the tests ran against a copy installed from that sdist."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import glm45_ops
import triton_ops

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = os.environ.get("GLM45_REQUIRE_INSTALLED") == "1"
# What a developer's tree holds that is not source: never compared, never shipped.
BUILD_PRODUCTS = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "wheels", "out", "*.egg-info", "__pycache__",
    "*.py[cod]", "*.so", ".pytest_cache", ".hypothesis", ".benchmarks",
)


def installed_copy(test):
    """A check of the installed copy: selected by `-m installed` (gpu_check.sh), run only where
    GLM45_REQUIRE_INSTALLED=1 says the tests are meant to import one."""
    skip = pytest.mark.skipif(not INSTALLED, reason="GLM45_REQUIRE_INSTALLED=1 (CI) checks an installed copy")
    return pytest.mark.installed(skip(test))


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its `setup()` call runs only as __main__)."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py next to the tests")
    spec = importlib.util.spec_from_file_location("glm45_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("requested", "archs", "changed"),
    [
        ("9.0a", ["9.0a"], []),
        ("9.0", ["9.0a"], ["9.0"]),
        ("9.0+PTX", ["9.0a+PTX"], ["9.0+PTX"]),
        ("8.0;9.0", ["8.0", "9.0a"], ["9.0"]),
        (" 9.0, 9.0a 10.0f+PTX ", ["9.0a", "10.0f+PTX"], ["9.0"]),  # ',' and ' ' separate too; once each
    ],
)
def test_plain_hopper_is_built_as_9_0a(setup_py, requested, archs, changed):
    """A 9.0 build compiles CUTLASS's sm90 GEMM body out (garbage output, no error): map it."""
    assert setup_py.resolve_arch_list(requested) == (archs, changed)


@pytest.mark.parametrize("requested", ["9.0", "9.0+PTX", "9.0;9.0a"])
def test_no_plain_sm90_code_reaches_nvcc(setup_py, requested):
    flags = setup_py.gencode_flags(setup_py.resolve_arch_list(requested)[0])
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert not [f for f in flags if "compute_90," in f or f.endswith(("sm_90", "compute_90"))], flags
    assert len(flags) == len(set(flags)), flags


def test_gencode_flags(setup_py):
    assert setup_py.gencode_flags(["9.0a+PTX", "10.0"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
        "-gencode=arch=compute_100,code=sm_100",
    ]


@pytest.mark.parametrize("requested", ["Hopper", "9", "sm_90", "9.0b", "", " ; "])
def test_unreadable_arch_list_is_refused_by_name(setup_py, requested):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup_py.resolve_arch_list(requested)


def _files(top: Path) -> set[str]:
    """Source files under `top`, relative to ROOT, build products left out."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(set(dirnames) - BUILD_PRODUCTS(dirpath, dirnames))
        out.update(str((Path(dirpath) / f).relative_to(ROOT)) for f in set(filenames) - BUILD_PRODUCTS(dirpath, filenames))
    return out


def test_sdist_holds_every_build_input(setup_py, tmp_path):
    """Built the way an isolated build sees it (no CUDA extension declared, so setuptools adds no
    source by itself), the sdist still holds csrc/, its source list, CMake and the tests, and no
    build product."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed")
    src = tmp_path / "src"  # a copy, so the checkout gets no egg-info
    shutil.copytree(ROOT, src, ignore=BUILD_PRODUCTS)
    env = {**os.environ, "GLM45_SKIP_CUDA_BUILD": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {"CMakeLists.txt", "README.md", "MANIFEST.in", "setup.py", "pyproject.toml"}
    for top in ("csrc", "tests", "glm45_ops", "triton_ops"):
        want |= _files(ROOT / top)
    want |= set(setup_py.read_sources())
    assert not want - names, f"missing from the sdist: {sorted(want - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))], "build products in the sdist"


@installed_copy
@pytest.mark.parametrize("module", [glm45_ops, triton_ops], ids=lambda m: m.__name__)
def test_tests_import_the_installed_copy(module):
    """CI installs the sdist non-editable: these tests must not have imported the checkout."""
    where = Path(module.__file__).resolve()
    assert not where.is_relative_to(ROOT), f"{module.__name__} imported from the checkout: {where}"
    assert "site-packages" in where.parts or "dist-packages" in where.parts, where


@installed_copy
def test_installed_extension_loaded():
    assert glm45_ops.extension_loaded(), glm45_ops.extension_error()
    ext = Path(sys.modules["glm45_ops._C"].__file__).resolve()
    assert ext.parent == Path(glm45_ops.__file__).resolve().parent, ext


@installed_copy
@pytest.mark.parametrize("module", [glm45_ops, triton_ops], ids=lambda m: m.__name__)
def test_installed_copy_has_every_package_file(module):
    """The wheel carries every file of the package (modules, subpackages, any data file)."""
    installed = Path(module.__file__).resolve().parent
    checkout = ROOT / module.__name__
    if not checkout.is_dir():
        pytest.skip(f"no {checkout} to compare with")
    rel = {str(Path(p).relative_to(module.__name__)) for p in _files(checkout)}
    have = {str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file()}
    assert not rel - have, f"missing from the installed {module.__name__}: {sorted(rel - have)}"


@installed_copy
@pytest.mark.parametrize("script", ["glm45-bench", "glm45-generate"])
def test_console_scripts_run(script):
    """pyproject's [project.scripts] reach the user's PATH and start."""
    path = Path(sys.executable).parent / script
    assert path.exists(), f"{script} not installed next to {sys.executable}"
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]
