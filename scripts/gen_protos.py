"""Regenerate the committed protobuf/gRPC code in protos/ from protos/*.proto.

The .proto files are compiled as if they lived at quire/protos/, so the generated
modules import each other as `quire.protos.X_pb2` and work from an installed package.
Usage: python scripts/gen_protos.py [--out DIR]   (DIR defaults to protos/)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

PROTOS = Path(__file__).resolve().parent.parent / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Write `<name>_pb2.py` and `<name>_pb2_grpc.py` for every proto into out_dir."""
    from grpc_tools import protoc

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "quire" / "protos"
        tree.mkdir(parents=True)
        for proto in sorted(PROTOS.glob("*.proto")):
            shutil.copy(proto, tree / proto.name)
        for proto in sorted(tree.glob("*.proto")):
            rel = proto.relative_to(tmp)
            rc = protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(rel)])
            if rc != 0:
                raise RuntimeError(f"protoc failed on {proto.name}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for generated in sorted(tree.glob("*_pb2*.py")):
            shutil.copy(generated, out_dir / generated.name)
            written.append(out_dir / generated.name)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTOS)
    for path in generate(parser.parse_args().out):
        print(path)
