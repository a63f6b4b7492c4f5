"""Regenerate the Python stubs in shared/v1 from proto/ (run: `make proto`)."""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
STUBS_DIR = ROOT / "shared" / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Writes clipmesh/v1/*_pb2*.py(i) under out_dir; returns the files written."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "clipmesh" / "v1").glob("*_pb2*"))


if __name__ == "__main__":
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copy(path, STUBS_DIR / path.name)
            print("wrote", STUBS_DIR / path.name, file=sys.stderr)
