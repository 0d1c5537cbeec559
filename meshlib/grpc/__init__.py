"""The mesh for grpcio: channels that route, balance and retry with the mesh's own stack, and
server interceptors that run the one inbound sequence (`meshlib.inbound`).

Nothing outside this package imports grpc: the protocol-neutral core sees gRPC only through
its `Wire` and the inbound `Request`.
"""

from meshlib.grpc.aio_channel import AioMeshChannel as AioMeshChannel
from meshlib.grpc.channel import MeshChannel as MeshChannel
