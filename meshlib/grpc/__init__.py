"""The mesh for grpcio: channels that route, balance and retry with the mesh's own stack, and
server interceptors that run the one inbound sequence (`meshlib.inbound`).

Nothing outside this package imports grpc: the protocol-neutral core sees gRPC only through
its `Wire` and the inbound `Request`.
"""

from meshlib.grpc.aio_channel import AioMeshChannel as AioMeshChannel
from meshlib.grpc.aio_server import MeshAioServerInterceptor as MeshAioServerInterceptor
from meshlib.grpc.aio_server import aio_server_interceptors as aio_server_interceptors
from meshlib.grpc.channel import MeshChannel as MeshChannel
from meshlib.grpc.server import MeshServerInterceptor as MeshServerInterceptor
from meshlib.grpc.server import server_interceptors as server_interceptors
from meshlib.grpc.serving import AioGrpcServing as AioGrpcServing
from meshlib.grpc.serving import GrpcServing as GrpcServing
