"""Build driver: setuptools runs CMake (CMakeLists.txt is the one build definition of the pybind11 extension).

Set CDUL_FAST_NO_EXT=1 to install without compiling; the package then uses its numpy.memmap fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        extdir = (Path.cwd() / self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if os.environ.get("CMAKE_GENERATOR") is None:
            try:
                import ninja  # noqa: F401

                cmake_args.append("-GNinja")
            except ImportError:
                pass
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", str(os.cpu_count() or 2)], cwd=build_temp,
                       check=True)


ext_modules = [] if os.environ.get("CDUL_FAST_NO_EXT") == "1" else [CMakeExtension("cdul_fast._store", ROOT)]

setup(
    packages=find_packages(include=["cdul_fast", "cdul_fast.*"]) + ["cdul_fast.kernels"],
    package_dir={"cdul_fast": "cdul_fast", "cdul_fast.kernels": "kernels"},
    package_data={"cdul_fast": ["configs/*.yaml", "assets/*/*", "py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
