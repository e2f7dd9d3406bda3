"""quire's wire contracts: the .proto files, their generated code, and the domain
dataclasses (with `to_pb`/`from_pb`) that the rest of quire uses instead of protobuf."""
