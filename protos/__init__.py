"""quire's wire contracts: the .proto files, their generated code, and the domain
dataclasses (with `to_pb`/`from_pb`) that the rest of quire uses instead of protobuf."""

# Channel and server options both ends of `quire.v1.Worker` use: plans are small, but a
# long new prompt or a resumed request's whole block table can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
