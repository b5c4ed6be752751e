"""Build driver: setuptools runs CMake (CMakeLists.txt is the one build definition of the pybind11 extension).

Set CDUL_FAST_NO_EXT=1 to install without compiling; the package then uses its numpy.memmap fallback. CMAKE_ARGS
(extra configure arguments), CMAKE_GENERATOR and CMAKE_BUILD_PARALLEL_LEVEL are honoured.

Why setuptools + CMake (pybind11's cmake_example) is kept rather than moving to scikit-build-core: the extension is
optional, and here one environment variable turns the same build definition into a pure ``py3-none-any`` wheel that
works through the fallback (tests/test_packaging.py builds and installs both wheels). scikit-build-core could express
that with conditional overrides, but the move would change no behaviour or figure; CMakeLists.txt stays the one
build definition either way.
"""

from __future__ import annotations

import os
import shlex
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
        cmake_args += shlex.split(os.environ.get("CMAKE_ARGS", ""))  # e.g. CMAKE_ARGS="-DCMAKE_CXX_FLAGS=-march=native"
        if os.environ.get("CMAKE_GENERATOR") is None:
            try:
                import ninja

                # The path explicitly: a build folder's CMake cache otherwise keeps the ninja of the isolated build
                # environment that configured it first, which pip has deleted by the next build (a rebuild failed).
                ninja_exe = Path(ninja.BIN_DIR) / "ninja"
                cmake_args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM:FILEPATH={ninja_exe}"]
            except ImportError:
                pass
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        build_args = ["--config", cfg]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += ["-j", str(os.cpu_count() or 2)]
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


ext_modules = [] if os.environ.get("CDUL_FAST_NO_EXT") == "1" else [CMakeExtension("cdul_fast.store._store", ROOT)]

setup(
    packages=find_packages(include=["cdul_fast", "cdul_fast.*"]),
    package_data={"cdul_fast": ["configs/*.yaml", "py.typed"], "cdul_fast.shapes": ["assets/*/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
