"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` over a FrontDoor.

Errors are gRPC statuses (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED past the message limit) with the message naming the field. Outputs come
back in ``raw_output_contents``, as Triton answers; inputs may be raw or typed ``contents``.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from amp4ec.frontdoor import tensors
from amp4ec.frontdoor.door import EXTENSIONS, SERVER_NAME, FrontDoor
from amp4ec.frontdoor.model import V2Error
from amp4ec.wire import transport
from amp4ec.wire.oip import grpc_predict_v2_pb2 as pb
from amp4ec.wire.oip import grpc_predict_v2_pb2_grpc as pb_grpc

__all__ = ["InferenceServicer", "start"]

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.door.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.door.version, extensions=EXTENSIONS)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        await self._check(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.door.ready())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        await self._check(context, request.name, request.version)
        meta = self.door.meta
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=[meta.version],
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request)
        except V2Error as e:
            await context.abort(_CODES.get(e.kind, grpc.StatusCode.INTERNAL), str(e))
            raise  # abort raises; this line is never reached

    async def _check(self, context: grpc.aio.ServicerContext, name: str, version: str) -> None:
        try:
            self.door.meta.check_name(name, version)
        except V2Error as e:
            await context.abort(_CODES[e.kind], str(e))

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        meta = self.door.meta
        meta.check_name(request.model_name, request.model_version)
        meta.check_inputs(len(request.inputs))
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise V2Error(
                "invalid",
                f"raw_input_contents: expected one entry per input ({len(request.inputs)}), "
                f"actual {len(raw)}",
            )
        inputs = []
        for i, spec in enumerate(request.inputs):
            field = f"inputs[{i}]"
            m = meta.check_input(i, spec.name, spec.datatype, spec.shape)
            if raw:
                if spec.HasField("contents"):
                    raise V2Error("invalid", f"{field}.contents: not allowed with raw_input_contents")
                inputs.append(tensors.from_raw(raw[i], m.datatype, spec.shape, f"raw_input_contents[{i}]"))
            else:
                inputs.append(
                    tensors.from_contents(spec.contents, m.datatype, spec.shape, f"{field}.contents")
                )
        wanted = [meta.output_index(o.name, f"outputs[{i}].name") for i, o in enumerate(request.outputs)]
        outputs = await self.door.infer(inputs)
        reply = pb.ModelInferResponse(model_name=meta.name, model_version=meta.version, id=request.id)
        for index in wanted or range(len(meta.outputs)):
            tensor = outputs[index]
            reply.outputs.add(
                name=meta.outputs[index].name, datatype=meta.outputs[index].datatype, shape=tensor.shape
            )
            reply.raw_output_contents.append(tensors.to_raw(tensor))
        return reply


async def start(
    door: FrontDoor,
    address: str,
    security: transport.TransportSecurity,
    authorise: Callable[[frozenset[str]], bool] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve ``door`` on ``address``; returns the started server and its port. Under TLS
    (``security`` not insecure) a client certificate is required when ``authorise`` is
    given, and its identities must pass it (PERMISSION_DENIED otherwise)."""
    limit = door.max_request_bytes
    policy = None if authorise is None else (lambda method, peers: authorise(peers))
    server = transport.server(
        security,
        policy,
        [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(door), server)
    port = transport.add_port(server, address, security, require_client_auth=authorise is not None)
    await server.start()
    return server, port
