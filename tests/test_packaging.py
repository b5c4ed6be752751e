"""The installed package, not the source tree (in the spirit of gsplat's tests/test_packaging.py).

* Every third-party module the package imports is a declared runtime dependency, or optional with a fallback that
  works when it is absent (Triton, DALI: checked by importing the package and labelling with both blocked).
* A wheel built from this tree holds every package file (kernels, configs, the shipped CLIP, the compiled store
  extension) and the console script; a wheel built without the extension holds no binary.
* Installed into a new virtualenv that never saw the source tree or the test extras, the wheel runs
  `cdul-fast demo --quick` from a folder outside the checkout, and the commands the demo prints work; the wheel
  without the extension then gives the same pseudo labels through the numpy fallback.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cdul_fast

ROOT = Path(__file__).resolve().parents[1]
DIST = "cdul-fast"
# Imported by the package but optional: each has a fallback with the same math (see _backend.py).
OPTIONAL = {"triton": "Triton kernels -> pure-torch twins", "nvidia": "DALI decoder -> PIL / tensor decoders",
            "pyarrow": "`tags --out x.parquet` (extra 'parquet') -> a one-line error naming pip install pyarrow"}
# Needed at run time although the package never imports them by name.
INDIRECT = {"onnxscript": "torch.onnx.export(dynamo=True), used by `cdul-fast export`"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    reqs = md.requires(DIST) or []
    return {_norm(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r}


def _package_dirs() -> list[Path]:
    return [Path(p) for p in cdul_fast.__path__]


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files importing it} over the installed package's sources (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for pkg in _package_dirs():
        for py in pkg.rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("cdul_fast", "__future__"):
                        found.setdefault(top, set()).add(py.name)
    return found


def test_runtime_imports_are_declared_dependencies() -> None:
    declared = _declared()
    assert {"torch", "onnx", "onnxruntime"} <= declared  # the parser found the real list
    dists = md.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        if module in OPTIONAL:
            continue
        owners = {_norm(d) for d in dists.get(module, [])}
        if not owners & declared:
            undeclared[module] = (sorted(owners), sorted(files))
    assert not undeclared, f"imported at run time but not in [project] dependencies: {undeclared}"
    missing_indirect = {m: why for m, why in INDIRECT.items() if _norm(m) not in declared}
    assert not missing_indirect, f"needed at run time but not declared: {missing_indirect}"


_BLOCKED_RUN = r"""
import importlib, importlib.abc, pkgutil, sys
BLOCKED = ("triton", "nvidia")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Block())
import cdul_fast
for m in pkgutil.walk_packages(cdul_fast.__path__, "cdul_fast."):
    if not m.name.startswith("cdul_fast.ops.kernels"):   # the Triton kernels themselves
        importlib.import_module(m.name)
from cdul_fast.cli import main
rc = main(["label", "--dataset", "shapes", "--root", sys.argv[1], "--split", "test", "--dataset-opt", "n=6",
           "--clip", "shapes-clip", "--out", sys.argv[2], "--decoder", "auto", "--backend", "auto", "--no-progress"])
assert not any(n.split(".")[0] in BLOCKED for n in sys.modules), "an optional module was imported"
sys.exit(rc)
"""


def test_optional_modules_have_working_fallbacks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(tmp_path / "shapes"), str(tmp_path / "s.cdul")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 images: 6 labelled" in proc.stdout and (tmp_path / "s.cdul").is_file()


# --- the built wheel -----------------------------------------------------------------------------------------------

def _source_copy(dst: Path) -> Path:
    """The checkout as a fresh clone has it (tracked and untracked-not-ignored files): a developer's build/ folder
    holds stale outputs of older layouts that setuptools would pack into the wheel."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        for rel in listed.stdout.splitlines():
            if (ROOT / rel).is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dst / rel)
        return dst
    shutil.copytree(ROOT, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "build", ".venv*", "__pycache__", "*.so", "*.egg-info", ".git"))
    return dst


def _build_wheel(out: Path, no_ext: bool) -> Path:
    env = dict(os.environ)
    env.pop("CDUL_FAST_NO_EXT", None)
    if no_ext:
        env["CDUL_FAST_NO_EXT"] = "1"
    src = _source_copy(out / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("cdul_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheels")
    return {"ext": _build_wheel(base / "ext", no_ext=False), "noext": _build_wheel(base / "noext", no_ext=True)}


def _source_package_files() -> set[str]:
    """Files the wheel must hold: the package tree as it is in the source tree (the two are the same tree)."""
    listed = subprocess.run(["git", "ls-files", "cdul_fast"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return set(listed.stdout.split())
    return {str(p.relative_to(ROOT)) for p in (ROOT / "cdul_fast").rglob("*")  # not a git checkout: files on disk
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")}


@pytest.mark.packaging
def test_wheel_holds_the_package(wheels: dict[str, Path]) -> None:
    expected = _source_package_files()
    assert "cdul_fast/shapes/assets/shapes-clip/open_clip_model.safetensors" in expected
    assert any(f.startswith("cdul_fast/ops/kernels/") for f in expected)
    for kind, whl in wheels.items():
        with zipfile.ZipFile(whl) as z:
            names = set(z.namelist())
            missing = sorted(expected - names)
            assert not missing, f"{kind} wheel lacks {missing}"
            info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
            assert re.search(r"^cdul-fast\s*=\s*cdul_fast\.cli:main$", z.read(info).decode(), re.M)
            meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        requires = {_norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0])
                    for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
        assert requires == _declared(), f"{kind} wheel's Requires-Dist differs from the installed metadata"
        binaries = [n for n in names if n.endswith((".so", ".pyd"))]
        if kind == "ext":
            assert [b.split(".")[0] for b in binaries] == ["cdul_fast/store/_store"], binaries
        else:
            assert binaries == [] and whl.name.endswith("-py3-none-any.whl"), (whl.name, binaries)


def _clean_env(venv: Path) -> dict[str, str]:
    """What a user's shell has: the venv first on PATH, none of this test run's Python or Triton settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET") and not k.startswith("CDUL_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str] | str, cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd if isinstance(cmd, list) else shlex.split(cmd), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _label_rows(demo_stdout: str) -> list[str]:
    return [line for line in demo_stdout.splitlines() if line.strip().startswith("pseudo labels (train),")]


@pytest.mark.packaging
def test_wheel_runs_the_quick_demo_in_a_clean_venv(wheels: dict[str, Path], tmp_path: Path) -> None:
    outside = tmp_path / "user"  # the working folder: nowhere near the checkout
    outside.mkdir()
    assert ROOT not in outside.parents
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                       env=_clean_env(venv) | {"PATH": os.environ.get("PATH", "")})
        env = _clean_env(venv)
        py = str(venv / "bin" / "python")
        _run([py, "-m", "pip", "install", "-q", str(wheels["ext"])], outside, env, timeout=1800)
        where = _run([py, "-c", "import cdul_fast, cdul_fast.store._store as s; print(cdul_fast.__file__); "
                      "print(s.__file__)"], outside, env).stdout.split()
        assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where
        # the test extras never reach this venv: nothing here may lean on them
        assert _run([py, "-c", "import importlib.util as u; print(u.find_spec('pytest') is None)"], outside,
                    env).stdout.strip() == "True"

        demo = _run(["cdul-fast", "demo", "--quick", "--no-progress", "--out", "demo"], outside, env).stdout
        onnx_row = re.search(r"classifier, ONNX Runtime \(test\)\s+([\d.]+)", demo)
        assert onnx_row, demo[-3000:]
        global_row = re.search(r"pseudo labels \(train\), global\s+([\d.]+)", demo)
        assert float(onnx_row.group(1)) > float(global_row.group(1))  # the classifier learned from the labels
        for f in ("train.cdul", "run/curves.png", "run/log.csv", "run/model.safetensors", "model.onnx",
                  "test_scores.csv", "run/epochs/epoch_001.safetensors", "report/index.html"):
            assert (outside / "demo" / f).stat().st_size > 0, f
        shown = [line.strip() for line in demo.splitlines() if line.strip().startswith("cdul-fast ")]
        assert len(shown) >= 3, demo[-2000:]
        last = demo.strip().splitlines()[-1]  # the demo ends with the report's path
        assert last.startswith("report: ") and Path(last.split(" ", 1)[1]).samefile(outside / "demo/report/index.html")
        for cmd in shown:  # every cdul-fast command the demo tells a user to run works as printed
            _run(cmd, outside, env)

        # the same wheel built without the extension: the numpy fallback, same pseudo labels
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheels["noext"])], outside, env)
        probe = _run([py, "-c", "import importlib.util as u; from cdul_fast._backend import store_ext; "
                      "print(u.find_spec('cdul_fast.store._store') is None, store_ext() is None)"], outside,
                     env | {"CDUL_FAST_QUIET_FALLBACK": "1"})
        assert probe.stdout.split() == ["True", "True"], probe.stdout
        fallback = _run(["cdul-fast", "demo", "--quick", "--no-progress", "--out", "demo-noext"], outside, env)
        assert "numpy.memmap fallback" in fallback.stderr
        assert re.search(r"classifier, ONNX Runtime \(test\)\s+[\d.]+", fallback.stdout), fallback.stdout[-3000:]
        assert _label_rows(fallback.stdout) == _label_rows(demo) and len(_label_rows(demo)) == 4
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB (torch): never leave it in pytest's kept temp dirs
