"""Implementation selection, API parity between native and twin, and the .pyi stubs."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import meshd_native
from meshd_native import _twin_framing, _twin_kv

PACKAGE_DIR = Path(meshd_native.__file__).parent


def _run(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHD_NO_EXTENSIONS"}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent), env.get("PYTHONPATH", "")])
    code = (
        "import meshd_native as m\n"
        "print(m.IMPLEMENTATION, m.load_native() is not None, m.crc32c(b'123456789'))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_env_var_forces_the_twin_but_native_stays_loadable() -> None:
    name, native_loadable, crc = _run({"MESHD_NO_EXTENSIONS": "1"})
    assert name == "twin"
    assert native_loadable == str(meshd_native.load_native() is not None)
    assert int(crc) == 0xE3069283


def test_default_prefers_native_when_built() -> None:
    name, native_loadable, _ = _run({})
    assert name == ("native" if native_loadable == "True" else "twin")
    assert native_loadable == str(meshd_native.load_native() is not None)


def test_package_functions_are_bound_to_the_live_implementation() -> None:
    live = meshd_native.live_implementation()
    assert live.name == meshd_native.IMPLEMENTATION
    for name in ("crc32c", "encode_envelope", "decode_envelope", "convert", "quantize", "merge_kv"):
        assert getattr(meshd_native, name).__self__ is live
    assert meshd_native.twin.name == "twin" and meshd_native.twin.features() == {}
    assert set(meshd_native.implementations()) >= {"twin"}
    assert meshd_native.native is meshd_native.load_native()
    if meshd_native.native is None:
        assert meshd_native.native_unavailable_reason()
    else:
        assert meshd_native.native_unavailable_reason() is None
        assert all(isinstance(v, bool) for v in meshd_native.native.features().values())


def test_all_is_complete() -> None:
    for name in meshd_native.__all__:
        assert hasattr(meshd_native, name), name


def _compiled(name: str):  # type: ignore[no-untyped-def]
    if meshd_native.load_native() is None:
        pytest.skip(f"compiled meshd_native unavailable: {meshd_native.native_unavailable_reason()}")
    return __import__(f"meshd_native.{name}", fromlist=[name])


@pytest.mark.parametrize(("compiled", "twin"), [("_framing", _twin_framing), ("_kv", _twin_kv)])
def test_kernel_modules_have_the_same_signatures(compiled: str, twin: object) -> None:
    module = _compiled(compiled)
    for name in twin.__all__:  # type: ignore[attr-defined]
        expected = inspect.signature(getattr(twin, name))
        actual = inspect.signature(getattr(module, name))
        # compiled kernels may add trailing keyword options (e.g. portable=)
        assert list(actual.parameters)[: len(expected.parameters)] == list(expected.parameters), name


@pytest.mark.parametrize("stub", sorted(p.name for p in PACKAGE_DIR.glob("*.pyi")))
def test_stubs_describe_the_compiled_modules(stub: str) -> None:
    module = _compiled(stub.removesuffix(".pyi"))
    tree = ast.parse((PACKAGE_DIR / stub).read_text())
    declared = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for name, node in declared.items():
        params = [a.arg for a in node.args.args]
        assert list(inspect.signature(getattr(module, name)).parameters) == params, name
    defined_here = {
        name
        for name, value in vars(module).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    }
    assert defined_here and defined_here <= set(declared), defined_here - set(declared)


def test_every_pyx_has_a_stub() -> None:
    pyx = {p.stem for p in PACKAGE_DIR.glob("*.pyx")}
    assert pyx and pyx == {p.stem for p in PACKAGE_DIR.glob("*.pyi")}
