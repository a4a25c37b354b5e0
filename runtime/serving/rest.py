"""The Open Inference Protocol over REST (KServe v2 HTTP/JSON, with Triton's binary tensor
extension as tritonclient.http speaks it), beside gRPC and over the same engine.

A small ASGI app, served by uvicorn inside the server's own asyncio loop. It only spells the
protocol in HTTP: an infer request becomes the ModelInferRequest the gRPC path takes (rest_wire:
binary chunks -> raw_input_contents, JSON data -> typed contents) and goes through the same
InferenceService.infer (wire.parse_infer, decode_input, engine claim and enqueue,
wire.infer_response); metadata and readiness come from the gRPC handlers' own bodies. The reply
protobuf is then written as JSON, with binary outputs after it where asked for.

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/NAME[/versions/V][/ready], POST
.../infer. Errors: {"error": message} with the HTTP status of the gRPC code (HTTP_STATUS)."""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
import zlib
from urllib.parse import unquote

import uvicorn

from runtime.engine.errors import EngineError, shown
from runtime.preprocess import InputError
from runtime.protocol import STREAM_HEADER, VERSION
from runtime.serving.errors import Request, status_of
from runtime.serving.inference import InferenceService
from runtime.serving.rest_wire import dumps, from_infer_response, to_infer_request
from runtime.serving.security import INFERENCE_SERVICE, BearerAuth
from runtime.serving.wire import pb

log = logging.getLogger("tta.rest")

# gRPC status code -> HTTP status (the v2 REST spec leaves the mapping to servers; Triton's is close)
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
               "ALREADY_EXISTS": 409, "ABORTED": 409, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
               "INTERNAL": 500}
HEADER_LENGTH = b"inference-header-content-length"  # Triton's binary tensor extension
REST_EXTENSIONS = ["binary_tensor_data"]  # besides the gRPC front's


class Refused(EngineError):
    """A request refused by the HTTP layer itself, with its own HTTP status (413, 405, ...)."""

    def __init__(self, code: str, message: str, http_status: int, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(code, message)
        self.http_status, self.headers = http_status, headers


def _bad(message: str) -> EngineError:
    return EngineError("INVALID_ARGUMENT", message)


def _too_large(limit: int, close: bool) -> Refused:
    return Refused("RESOURCE_EXHAUSTED", f"request body larger than the server's limit of {limit} bytes (tta serve "
                                         f"--max-message-mb)", 413, (("connection", "close"),) if close else ())


class RestApp:
    """The ASGI application: one InferenceService (its model, engine, readiness and statistics)
    behind HTTP routes, with the gRPC front's bearer tokens (`auth`) and message limit (`max_body`)."""

    def __init__(self, inference: InferenceService, auth: BearerAuth | None, max_body: int):
        self.inference, self.auth, self.max_body = inference, auth, max_body
        self.metrics = inference.metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan and websockets are off
            return
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)
        try:
            status, extra, body = await self._route(scope, headers, receive)
        except (EngineError, InputError) as e:
            status, extra, body = _failure(e)
        except Exception:  # noqa: BLE001 - a bug: logged here, the client gets no path or traceback
            log.exception("REST %s %s failed", scope.get("method"), shown(scope.get("path", ""), 80))
            status, extra, body = 500, [], dumps({"error": "internal server error; the server log has the details"})
        out = [(b"content-length", str(len(body)).encode())]
        if not any(k == "content-type" for k, _ in extra):
            out.append((b"content-type", b"application/json"))
        out += [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    # --- routing ----------------------------------------------------------------------------
    async def _route(self, scope, headers, receive):
        raw_path = scope.get("raw_path") or scope["path"].encode()
        parts = [unquote(p.decode("latin-1")) for p in raw_path.split(b"?")[0].strip(b"/").split(b"/")]
        method = scope["method"]
        if parts == ["v2", "health", "live"]:
            return self._get(method, "ServerLive", headers) or (200, [], dumps({"live": True}))
        if parts == ["v2", "health", "ready"]:
            ready = self.inference.ready
            return self._get(method, "ServerReady", headers) or (200 if ready else 503, [], dumps({"ready": ready}))
        if parts == ["v2"]:
            return self._get(method, "ServerMetadata", headers) or await self._server_metadata()
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            name, version, rest = parts[2], "", parts[3:]
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if rest == []:
                return self._get(method, "ModelMetadata", headers) or await self._counted(
                    "HTTP model metadata", None, self._model_metadata(name, version))
            if rest == ["ready"]:
                return self._get(method, "ModelReady", headers) or await self._counted(
                    "HTTP model ready", None, self._model_ready(name, version))
            if rest == ["infer"]:
                if method != "POST":
                    raise Refused("UNIMPLEMENTED", "infer takes POST", 405, (("allow", "POST"),))
                self._authorize("ModelInfer", headers)
                return await self._counted("HTTP infer", self.inference.outcomes,
                                           self._infer(name, version, headers, receive))
        raise Refused("NOT_FOUND", f"no such endpoint {shown(scope['path'], 80)}; the Open Inference Protocol's "
                                   f"are /v2/health/live, /v2/health/ready, /v2, /v2/models/<name>[/versions/<v>]"
                                   f"[/ready|/infer]", 404)

    def _get(self, method: str, rpc: str, headers) -> None:
        """Checks a GET route: method, then token. None when it may go on (so `or` runs the route)."""
        if method != "GET":
            raise Refused("UNIMPLEMENTED", f"this endpoint takes GET, not {shown(method, 16)}", 405,
                          (("allow", "GET"),))
        self._authorize(rpc, headers)

    def _authorize(self, rpc: str, headers) -> None:
        """The gRPC front's rule for `rpc` (security.BearerAuth), on the Authorization header."""
        if self.auth is None:
            return
        given = headers.get(b"authorization")
        refused = self.auth.refusal(INFERENCE_SERVICE + rpc, None if given is None else given.decode("latin-1"))
        if refused is not None:
            code, message = refused
            extra = (("www-authenticate", 'Bearer realm="tta-runtime"'),) if code.name == "UNAUTHENTICATED" else ()
            raise Refused(code.name, message.replace("metadata 'authorization", "header 'Authorization"),
                          HTTP_STATUS[code.name], extra)

    async def _counted(self, method: str, outcomes, work):
        """Runs `work` counted in the serving metrics as gRPC requests are (errors.Request)."""
        account = Request(self.metrics, method, outcomes)
        try:
            result = await work
        except (EngineError, InputError) as e:
            account.failed(e)
            raise
        account.ok()
        return result

    # --- metadata and readiness: the gRPC handlers' bodies -------------------------------------
    async def _server_metadata(self):
        m = await InferenceService.ServerMetadata.__wrapped__(self.inference, pb.ServerMetadataRequest(), None)
        return 200, [], dumps({"name": m.name, "version": m.version, "extensions": [*m.extensions, *REST_EXTENSIONS]})

    async def _model_metadata(self, name: str, version: str):
        handler = InferenceService.ModelMetadata.__wrapped__  # undecorated: counted here, as HTTP
        m = await handler(self.inference, pb.ModelMetadataRequest(name=name, version=version), None)
        tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]
        return 200, [], dumps({"name": m.name, "versions": list(m.versions), "platform": m.platform,
                               "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)})

    async def _model_ready(self, name: str, version: str):
        await self._model_metadata(name, version)  # unknown model or version: 404, as metadata
        handler = InferenceService.ModelReady.__wrapped__
        ready = (await handler(self.inference, pb.ModelReadyRequest(name=name, version=version), None)).ready
        return 200 if ready else 503, [], dumps({"name": name, "ready": ready})

    # --- inference --------------------------------------------------------------------------
    async def _infer(self, name: str, version: str, headers, receive):
        body = await self._body(headers, receive)
        request, binary = to_infer_request(body, headers.get(HEADER_LENGTH), name, version)
        stream = headers.get(STREAM_HEADER.encode())
        metadata = [(STREAM_HEADER, stream.decode("utf-8", "replace"))] if stream is not None else []
        response = await self.inference.infer(request, metadata)  # no deadline: HTTP clients send none
        return from_infer_response(response, binary)

    async def _body(self, headers, receive) -> bytes:
        """The request body, refused (413) as soon as it is known to pass max_body: from
        Content-Length before reading any of it, else counting what arrives; then inflated if
        gzip- or deflate-encoded (tritonclient's request_compression_algorithm), within max_body too.
        A client that waits for 100-continue is refused before it sends any of it. So that one
        already sending reads the 413 (not a reset), an overrun of up to max_body more is read and
        dropped first, never kept; past that the connection is closed at once."""
        limit = self.max_body
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _bad("Content-Length must be a number of bytes")
            waits = b"100-continue" in headers.get(b"expect", b"").lower()
            if int(declared) > limit and (waits or int(declared) > 2 * limit):
                raise _too_large(limit, close=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise EngineError("CANCELLED", "the client went away before sending the whole request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > 2 * limit:
                raise _too_large(limit, close=True)
            if size <= limit:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if size > limit:
            raise _too_large(limit, close=False)
        body = b"".join(chunks)
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding in (b"gzip", b"deflate"):
            inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib stream, told by its header
            try:
                body = inflater.decompress(body, limit + 1)
            except zlib.error as e:
                raise _bad(f"the request body is not valid {encoding.decode()} data ({e})") from None
            if len(body) > limit or inflater.unconsumed_tail:
                raise _too_large(limit, close=False)
            if not inflater.eof:
                raise _bad(f"the request body's {encoding.decode()} data is truncated")
        elif encoding not in (b"identity", b""):
            raise Refused("INVALID_ARGUMENT", f"Content-Encoding {shown(encoding.decode('latin-1'), 32)} is not "
                                              f"supported; send gzip, deflate or none", 415)
        return body


def _failure(error: Exception) -> tuple[int, list, bytes]:
    """The HTTP reply of a refused request: status, headers (Retry-After for a refusal under load,
    as gRPC's retry pushback; the engine's metadata, e.g. tta-holder), {"error": message}."""
    code, message = status_of(error)
    status = getattr(error, "http_status", None) or HTTP_STATUS.get(code.name, 500)
    headers = list(getattr(error, "headers", ()))
    retry_after = getattr(error, "retry_after", None)
    if retry_after:
        headers.append(("retry-after", str(max(1, math.ceil(retry_after)))))
    headers += [(k, str(v)) for k, v in getattr(error, "metadata", ())]
    return status, headers, dumps({"error": message})


# --- the server --------------------------------------------------------------------------------
def tls_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """HTTPS from the gRPC port's PEM certificate and key, requiring client certificates signed by
    `client_ca` when given (mutual TLS); None without a certificate."""
    if not cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


class RestServer:
    """uvicorn serving a RestApp in the running asyncio loop (grpc.aio's). Driven through
    uvicorn.Server's startup / main_loop / shutdown rather than serve(), which would install its
    own SIGINT/SIGTERM handlers over the server's; no logging config, no access log, no lifespan."""

    def __init__(self, app: RestApp):
        self.app = app
        self.server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen on host:port (0: a free port); returns the port. OSError when it cannot."""
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=2048,  # raises OSError
                                            dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
                                interface="asgi3", proxy_headers=False, server_header=False,
                                headers=[("server", f"tta-runtime/{VERSION}")])
        config.load()
        config.ssl = tls  # our context (TLS 1.2+, client certificates) instead of uvicorn's own
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)  # what Server.serve() would set: LifespanOff
        await self.server.startup(sockets=[self._socket])
        self._ticker = asyncio.create_task(self.server.main_loop())  # Date header, once a second
        return self._socket.getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stop listening, let requests in flight finish for up to `grace` seconds, then cancel them."""
        if self.server is None:
            return
        self.server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        self.server.config.timeout_graceful_shutdown = max(grace, 0.1)
        await self.server.shutdown(sockets=[self._socket])
        self.server = None
