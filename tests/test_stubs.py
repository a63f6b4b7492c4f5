"""The committed stubs in shared/v1 must be exactly what proto/ generates today."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SHARED = ROOT / "shared"   # the `clipmesh` package: clipmesh/v1/x_pb2.py lives at shared/v1/x_pb2.py
FIX = "the stubs in shared/v1 are stale: run `make proto` and commit the result"


def _load_generator():
    # proto/ is not a package, so load generate.py straight from its path.
    spec = importlib.util.spec_from_file_location("clipmesh_proto_generate", PROTO_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[Path, Path]:
    """Freshly generated stubs, keyed by their path relative to the output dir."""
    out = tmp_path_factory.mktemp("stubs")
    files = _load_generator().generate(out)
    assert files, "proto/generate.py produced no stubs"
    return {path.relative_to(out): path for path in files}


def _committed(rel: Path) -> Path:
    assert rel.parts[0] == "clipmesh", rel
    return SHARED.joinpath(*rel.parts[1:])


def test_generated_stubs_match_committed(generated):
    for rel, fresh in generated.items():
        committed = _committed(rel)
        assert committed.is_file(), f"{committed.relative_to(ROOT)} is missing; {FIX}"
        assert fresh.read_bytes() == committed.read_bytes(), \
            f"{committed.relative_to(ROOT)} differs from what proto/ generates; {FIX}"


def test_every_proto_produced_stubs(generated):
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    assert protos, "no .proto files under proto/"
    for proto in protos:
        stem = proto.relative_to(PROTO_DIR).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            rel = stem.with_name(stem.name + suffix)
            assert rel in generated, f"{proto.relative_to(ROOT)} produced no {rel}; is generate() missing it?"
            assert _committed(rel).is_file(), f"{_committed(rel).relative_to(ROOT)} is missing; {FIX}"


def test_no_orphaned_committed_stubs(generated):
    # A stub whose .proto was deleted or renamed would otherwise linger and still import.
    expected = {_committed(rel) for rel in generated}
    for committed in sorted(SHARED.rglob("*_pb2*")):
        if committed.suffix not in (".py", ".pyi"):
            continue   # __pycache__/*.pyc
        assert committed in expected, \
            f"{committed.relative_to(ROOT)} has no .proto under proto/; delete it or run `make proto`"
