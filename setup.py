"""Build meshd, compiling meshd_native's Cython kernels when possible.

The extensions are optional: without Cython, without a compiler, or with
MESHD_NO_EXTENSIONS=1, the install still succeeds and meshd_native selects its
bit-exact pure-Python twin at import time.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A build_ext whose failure is reported, never fatal."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the twin"
            self._warn(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc: Exception) -> None:
        sys.stderr.write(
            f"warning: meshd_native extension not built ({exc}); "
            "the pure-Python twin will be used\n"
        )


def native_extensions() -> list:
    if os.environ.get("MESHD_NO_EXTENSIONS") == "1":
        return []
    sources = sorted(glob.glob(os.path.join("meshd_native", "*.pyx")))
    if not sources:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write("warning: Cython not available; meshd_native uses its pure-Python twin\n")
        return []
    from setuptools import Extension

    extensions = [
        Extension(
            "meshd_native." + os.path.splitext(os.path.basename(src))[0],
            [src],
            extra_compile_args=["-O3"],
        )
        for src in sources
    ]
    try:
        return cythonize(extensions, language_level=3, quiet=True)
    except Exception as exc:  # noqa: BLE001
        OptionalBuildExt._warn(exc)
        return []


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
