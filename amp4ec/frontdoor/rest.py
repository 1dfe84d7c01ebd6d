"""The Open Inference Protocol over HTTP/REST (KServe/Triton "v2"), with the binary tensor
data extension: an aiohttp application over a FrontDoor.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``POST .../infer``. Errors are ``{"error": "..."}`` with the status of their
kind (see [Note: v2 errors] in model.py); health answers 200 for true and 400 for false, as
the protocol says.

[Note: binary tensor data] A request whose ``Inference-Header-Content-Length`` header is N
carries its JSON in the first N bytes of the body, then the raw bytes of every input whose
``parameters.binary_data_size`` is set, in input order. Outputs come back raw (same layout,
``binary_data_size`` in each output's parameters) when the request asks, per output
(``outputs[i].parameters.binary_data``) or for all (``parameters.binary_data_output``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from aiohttp import web

from amp4ec.frontdoor import tensors
from amp4ec.frontdoor.door import EXTENSIONS, SERVER_NAME, FrontDoor
from amp4ec.frontdoor.model import V2Error

__all__ = ["HEADER_LENGTH", "Authorise", "app", "peer_identities"]

HEADER_LENGTH = "Inference-Header-Content-Length"
Authorise = Callable[[frozenset[str]], bool]
"""authorise(the client certificate's verified identities) → allowed."""
_DOOR = web.AppKey("door", FrontDoor)
_AUTHORISE = web.AppKey("authorise", object)
"""An ``Authorise`` or None (no client certificate required)."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def peer_identities(request: web.Request) -> frozenset[str]:
    """The identities (DNS SANs under ``.amp4ec``) of the client certificate TLS verified."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    names = (cert or {}).get("subjectAltName", ())
    return frozenset(v for k, v in names if k == "DNS" and v.endswith(".amp4ec"))


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        authorise = request.app[_AUTHORISE]
        if authorise is not None:
            peers = peer_identities(request)
            if not authorise(peers):
                who = ", ".join(sorted(peers)) or "a client without an amp4ec identity"
                return _error(403, f"{who} may not call {request.method} {request.path}")
        return await handler(request)
    except V2Error as e:
        return _error(e.http_status, str(e))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[_DOOR].max_request_bytes
        return _error(413, f"request body: larger than this server's limit of {limit} bytes")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, f"{request.method} {request.path}: {e.reason}")


def app(door: FrontDoor, authorise: Authorise | None = None) -> web.Application:
    """The v2 REST routes over ``door``; with ``authorise``, every request's client certificate
    identities must pass it (403 otherwise; TLS has verified the certificate itself)."""
    application = web.Application(client_max_size=door.max_request_bytes, middlewares=[_errors])
    application[_DOOR] = door
    application[_AUTHORISE] = authorise
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    application.add_routes(
        [
            web.get("/v2", _server_metadata),
            web.get("/v2/health/live", _live),
            web.get("/v2/health/ready", _ready),
            *(web.get(p, _model_metadata) for p in (model, versioned)),
            *(web.get(p + "/ready", _model_ready) for p in (model, versioned)),
            *(web.post(p + "/infer", _infer) for p in (model, versioned)),
        ]
    )
    return application


def _health(ok: bool) -> web.Response:
    return web.Response(status=200 if ok else 400)


async def _server_metadata(request: web.Request) -> web.Response:
    door = request.app[_DOOR]
    return web.json_response({"name": SERVER_NAME, "version": door.version, "extensions": list(EXTENSIONS)})


async def _live(request: web.Request) -> web.Response:
    return _health(True)


async def _ready(request: web.Request) -> web.Response:
    return _health(request.app[_DOOR].ready())


def _model(request: web.Request) -> FrontDoor:
    door = request.app[_DOOR]
    door.meta.check_name(request.match_info["name"], request.match_info.get("version", ""))
    return door


async def _model_metadata(request: web.Request) -> web.Response:
    return web.json_response(_model(request).meta.to_json())


async def _model_ready(request: web.Request) -> web.Response:
    return _health(_model(request).ready())


def _split(request: web.Request, body: bytes) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary part that follows it (see [Note: binary tensor data])."""
    raw_length = request.headers.get(HEADER_LENGTH)
    length = len(body)
    if raw_length is not None:
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise V2Error(
                "invalid",
                f"{HEADER_LENGTH}: expected 0..{len(body)} (the body's size), actual {raw_length!r}",
            )
    limit = request.app[_DOOR].max_json_bytes
    if length > limit:
        raise V2Error(
            "too_large",
            f"request body: its JSON part ({length} bytes) is larger than this server's limit of {limit} "
            f"bytes; send large tensors as binary data ({HEADER_LENGTH}, parameters.binary_data_size)",
        )
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as e:
        raise V2Error("invalid", f"request body: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise V2Error("invalid", "request body: expected a JSON object")
    return header, memoryview(body)[length:]


def _shape(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise V2Error("invalid", f"{field}: expected a list of integers, actual {json.dumps(value)[:80]}")
    return value


def _inputs(door: FrontDoor, header: dict[str, Any], binary: memoryview) -> list[torch.Tensor]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise V2Error("invalid", "inputs: expected a list of input tensors")
    door.meta.check_inputs(len(inputs))
    out, offset = [], 0
    for i, spec in enumerate(inputs):
        field = f"inputs[{i}]"
        if not isinstance(spec, dict):
            raise V2Error("invalid", f"{field}: expected an object with name, datatype, shape and data")
        shape = _shape(spec.get("shape"), f"{field}.shape")
        meta = door.meta.check_input(i, spec.get("name"), spec.get("datatype"), shape)
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise V2Error(
                    "invalid",
                    f"{field}.parameters.binary_data_size: expected 0..{len(binary) - offset} "
                    f"(the binary bytes left), actual {size!r}",
                )
            out.append(
                tensors.from_raw(binary[offset : offset + size], meta.datatype, shape, f"{field} binary data")
            )
            offset += size
        elif "data" in spec:
            out.append(tensors.from_json(spec["data"], meta.datatype, shape, f"{field}.data"))
        else:
            raise V2Error("invalid", f"{field}.data: missing (or parameters.binary_data_size)")
    if offset != len(binary):
        raise V2Error("invalid", f"request body: {len(binary) - offset} bytes of binary data no input claims")
    return out


def _wanted(door: FrontDoor, header: dict[str, Any]) -> list[tuple[int, bool]]:
    """(output index, as binary) for each output to return, in the order asked."""
    params = header.get("parameters") or {}
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    asked = header.get("outputs")
    if asked is None:
        return [(i, default) for i in range(len(door.meta.outputs))]
    if not isinstance(asked, list):
        raise V2Error("invalid", "outputs: expected a list of requested outputs")
    wanted = []
    for i, spec in enumerate(asked):
        if not isinstance(spec, dict):
            raise V2Error("invalid", f"outputs[{i}]: expected an object with a name")
        index = door.meta.output_index(spec.get("name"), f"outputs[{i}].name")
        out_params = spec.get("parameters") or {}
        binary = out_params.get("binary_data", default) if isinstance(out_params, dict) else default
        wanted.append((index, bool(binary)))
    return wanted


async def _infer(request: web.Request) -> web.Response:
    door = _model(request)
    header, binary = _split(request, await request.read())
    inputs = _inputs(door, header, binary)
    wanted = _wanted(door, header)
    outputs = await door.infer(inputs)
    body: dict[str, Any] = {"model_name": door.meta.name, "model_version": door.meta.version}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    body["outputs"], raw = [], []
    for index, as_binary in wanted:
        meta, tensor = door.meta.outputs[index], outputs[index]
        entry: dict[str, Any] = {"name": meta.name, "datatype": meta.datatype, "shape": list(tensor.shape)}
        if as_binary:
            raw.append(tensors.to_raw(tensor))
            entry["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            entry["data"] = tensors.to_json(tensor)
        body["outputs"].append(entry)
    if not raw:
        return web.json_response(body)
    head = json.dumps(body).encode()
    return web.Response(
        body=b"".join([head, *raw]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )
