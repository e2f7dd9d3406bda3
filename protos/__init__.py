"""quire's wire contracts: the .proto files, their generated code, and the domain
dataclasses (with `to_pb`/`from_pb`) that the rest of quire uses instead of protobuf.

Importing this package checks the protobuf runtime first: the committed *_pb2.py refuse an
older runtime than the protoc that generated them (with a message naming neither quire nor
the fix, or, from protobuf < 5.26, only a missing `runtime_version`), and every module here
imports them, so an old runtime fails now with an ImportError naming both versions."""
import re as _re

# The versions the committed generated code was built with and checks for at run time
# (kept equal to the headers of *_pb2.py and *_pb2_grpc.py by tests/test_gpu_check.py).
PROTOBUF_NEEDED = "7.35.1"
GRPCIO_NEEDED = "1.85.1"


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "7.36.2" → (7, 36, 2), "6.31.0rc1" → (6, 31, 0)."""
    return tuple(int(part) for part in _re.findall(r"\d+", _re.match(r"[\d.]*", version).group())[:3])


def _check_protobuf() -> None:
    try:
        from google.protobuf import __version__ as installed
    except ImportError as error:
        raise ImportError(f"quire.protos needs protobuf>={PROTOBUF_NEEDED}; it is not installed") from error
    if version_tuple(installed) < version_tuple(PROTOBUF_NEEDED):
        raise ImportError(f"quire.protos needs protobuf>={PROTOBUF_NEEDED} (its generated code checks for the "
                          f"version that generated it); protobuf {installed} is installed: "
                          f"pip install 'protobuf>={PROTOBUF_NEEDED}'")


_check_protobuf()

# Channel and server options both ends of `quire.v1.Worker` use: plans are small, but a
# long new prompt or a resumed request's whole block table can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
