"""Who may call what: bearer tokens (control and inference) checked by an interceptor, and the
TLS credentials of the listening port."""
from __future__ import annotations

import hmac
import os

import grpc

from runtime.protocol import CONTROL_TOKEN_ENV, INFERENCE_TOKEN_ENV

CONTROL_SERVICE = "/tta.v1.AdaptationService/"
READ_ONLY_CONTROL = {"ListPolicies", "GetStream", "ListStreams"}
INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
OPEN_INFERENCE = {"ServerLive", "ServerReady"}  # probes; everything else needs the inference token when set


class BearerAuth(grpc.aio.ServerInterceptor):
    """Bearer tokens, compared in constant time.

    - Control RPCs that change state need the control token; with only an inference token set,
      they need that one (an inference-token server leaves no control RPC open).
    - Read-only control RPCs (ListPolicies, GetStream, ListStreams: every stream id, its
      hyperparameters and snapshot names) are open unless an inference token is set; then they
      take the inference or the control token.
    - The inference service needs the inference token, except ServerLive/ServerReady (liveness
      and readiness reveal nothing and probes cannot send tokens).
    grpc.health.v1 and reflection stay open."""

    def __init__(self, control_token: str | None, inference_token: str | None):
        self.control = control_token.encode() if control_token else None
        self.inference = inference_token.encode() if inference_token else None

    def _required(self, method: str) -> tuple[tuple[bytes, ...], str, str] | None:
        """(tokens any of which opens this method, which token, how a client sends it), or None."""
        ctl = f"tta ctl: --token or ${CONTROL_TOKEN_ENV}"
        triton = "tritonclient: headers={'authorization': 'Bearer <token>'}"
        if method.startswith(CONTROL_SERVICE):
            if method[len(CONTROL_SERVICE):] in READ_ONLY_CONTROL:
                if not self.inference:
                    return None
                if self.control:
                    return (self.inference, self.control), "inference or control", f"{ctl}; or the inference token"
                return (self.inference,), "inference", "tta ctl: --token"
            if self.control:
                return (self.control,), "control", ctl
            if self.inference:
                return (self.inference,), "inference", "tta ctl: --token"
            return None
        if self.inference and method.startswith(INFERENCE_SERVICE) and \
                method[len(INFERENCE_SERVICE):] not in OPEN_INFERENCE:
            return (self.inference,), "inference", triton
        return None

    def refusal(self, method: str, given: str | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a call of `method` ("/package.Service/Rpc") with authorization value `given` (None:
        absent) is refused, or None when it may go on. The REST front asks this too, naming the
        RPC each of its routes stands for."""
        required = self._required(method)
        if required is None:
            return None
        expected, which, how = required
        scheme, _, token = str(given or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"{'missing' if given is None else 'malformed'} authorization: this RPC needs metadata "
                    f"'authorization: Bearer <{which} token>' ({how})")
        given_token = token.strip().encode()
        if not any([hmac.compare_digest(given_token, t) for t in expected]):  # a list: compare with every one
            return grpc.StatusCode.PERMISSION_DENIED, f"wrong {which} token"
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        given = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), None)
        refused = self.refusal(details.method, given)
        return handler if refused is None else _denied(handler, *refused)


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind (unary or streaming) as `handler` that only fails."""
    async def deny(request, context):
        await context.abort(code, message)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def tls_credentials(cert: str | None, key: str | None, client_ca: str | None):
    """Server credentials from a PEM certificate and key (and a client CA for mutual TLS), or None."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    ca = _read(client_ca) if client_ca else None
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_token(path: str | None, env: str) -> str | None:
    """A bearer token from a file (stripped), else from the environment variable."""
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return os.environ.get(env, "").strip() or None


def interceptors(control_token_file: str | None, inference_token_file: str | None) -> tuple[list, bool, bool]:
    """The server's interceptors for the configured tokens, and whether each token is set."""
    control = read_token(control_token_file, CONTROL_TOKEN_ENV)
    inference = read_token(inference_token_file, INFERENCE_TOKEN_ENV)
    return ([BearerAuth(control, inference)] if control or inference else []), bool(control), bool(inference)
