"""Who may call a peer: the shared token, and the flow file as the access list.

Every ``Continue`` passes here before the servicer sees it (:class:`Guard` wraps the
service's handlers), in this order:

1. **Token.** With a token configured (``token_file`` or ``$MESH_TOKEN``), a call without
   ``authorization: Bearer <token>`` metadata, or with another token, is UNAUTHENTICATED.
2. **Shape.** The raw bytes must be a ``ContinueRequest`` naming a flow this peer knows and
   a line it has, with a ``flow_id`` and a call chain (``via``) that could be real: no longer
   than the flow has lines, no machine twice, not this machine (a flow never calls the
   machine it is on). Anything else is INVALID_ARGUMENT, NOT_FOUND or OUT_OF_RANGE with a
   short message (a request's own strings are cut, never echoed whole). An empty ``via`` is a
   caller from outside the mesh that names no machine; it may start a flow like any other.
3. **Access list.** Line 0 may come from any caller that got this far: it is a flow's entry.
   Line N > 0 only from the machine that owns line N-1, because that is the only machine that
   hands a flow on to line N (a hand-back travels in a reply, never as a call). Anything else
   is PERMISSION_DENIED, logged with the caller and the line; no handler runs.

The servicer gets the call with its :func:`fingerprint` (a hash of its bytes and of the
caller's certificate names), which the reply record keys retries by: only the very call
that ran a step gets its reply again (mesh/dedup.py).

Who the caller is: with mutual TLS, the machine names in its certificate (trusted: a CA
signed them). Without client certificates, the machine the call names as the last of its
``via`` chain (trusted as far as the token is: a token holder can claim any machine, so the
access list then guards against mistakes and stale flow files more than against a hostile
token holder). The health service is not guarded, so probes need no token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import grpc
import structlog
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from mesh.credentials import peer_machines
from mesh.flowfile import Flow, FlowSet
from mesh.token import Token
from mesh.v1 import mesh_pb2 as _pb2
from mesh.wire import step_error

__all__ = ["CONTINUE", "ClientToken", "Guard", "fingerprint"]

_log = structlog.get_logger("mesh")

CONTINUE = "/mesh.v1.Mesh/Continue"

#: Longest string of a request the guard will quote back in a message.
_SHOWN = 60
#: Longest flow_id or machine name a call may carry (an originator's flow_id is 32 hex digits).
MAX_NAME = 256


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _CallDetails(_Details, grpc.ClientCallDetails):  # type: ignore[misc]
    pass


class ClientToken(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the token to every call a channel makes (call credentials would need TLS)."""

    def __init__(self, token: Token) -> None:
        self._pair = token.header()

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        metadata = [*(details.metadata or ()), self._pair]
        new = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return continuation(new, request)


class Guard:
    """Admits or refuses each call of the mesh service (see the module docstring).

    It wraps the service's method handlers where they are registered
    (:meth:`method_handlers`) rather than intercepting the server: a server
    interceptor runs gRPC's interceptor pipeline and builds a new handler on
    every call, a tenth of the Python a hop costs (scripts/bench.py); the
    health service, registered apart, stays open either way.
    """

    def __init__(
        self,
        machine: str,
        flows: FlowSet,
        token: Token | None,
        max_message_bytes: int,
        *,
        tls: bool = False,
    ) -> None:
        self._machine = machine
        self._tls = tls  # this peer serves TLS, so callers may present certificates
        self._flows = flows
        self._token = token
        self._limit = max_message_bytes

    def method_handlers(
        self, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> dict[str, grpc.RpcMethodHandler]:
        """``handlers`` (method name -> handler of mesh.v1.Mesh), each behind the guard.

        ``Continue`` gets every check; any other method of the service, the token check.
        """
        return {
            name: self._continue(handler) if name == "Continue" else self._token_only(handler)
            for name, handler in handlers.items()
        }

    def _authenticated(self, context: grpc.ServicerContext) -> None:
        if self._token is not None and not self._token.matches(context.invocation_metadata()):
            self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, f"{self._machine}: missing or wrong token"
            )

    def _continue(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        deserialize = handler.request_deserializer

        def admit(raw: bytes, context: grpc.ServicerContext) -> Any:
            self._authenticated(context)
            request = self._decode(raw, context, deserialize)
            # Without TLS there is no certificate to ask gRPC about.
            certified = peer_machines(context) if self._tls else None
            self._check(request, context, certified)
            return self._bounded(request, inner(request, context, fingerprint(raw, certified)))

        # Raw bytes in: a message that does not decode is the guard's to refuse clearly,
        # instead of gRPC's own "Exception deserializing request!" (INTERNAL).
        return grpc.unary_unary_rpc_method_handler(
            admit, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _token_only(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with the token checked before it runs (any kind of method)."""
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        attr, make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
        inner = getattr(handler, attr)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            self._authenticated(context)
            return inner(request, context)

        return make(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- the checks --------------------------------------------------------------------

    def _decode(
        self,
        raw: bytes,
        context: grpc.ServicerContext,
        deserialize: Callable[[bytes], Any] | None = None,
    ) -> _pb2.ContinueRequest:
        try:
            request: _pb2.ContinueRequest = (deserialize or _pb2.ContinueRequest.FromString)(raw)
            return request
        except (DecodeError, ValueError, TypeError) as exc:
            self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self._machine}: the call is not a mesh.v1.ContinueRequest"
                f" ({len(raw):,} bytes: {_cut(str(exc))})",
            )

    def _check(
        self,
        request: _pb2.ContinueRequest,
        context: grpc.ServicerContext,
        certified: frozenset[str] | None = None,
    ) -> None:
        flow = self._flows.flows.get(request.request)
        index = request.line_index
        flow_id = request.flow_id
        via = request.via
        # Every call passes here: one test for the shape of a real call, the reasons
        # worked out only for a call that fails it.
        if (
            flow is None
            or index >= len(flow.lines)
            or not flow_id
            or len(flow_id) > MAX_NAME
            or len(via) > len(flow.lines)
            or (
                via
                and (
                    len(set(via)) != len(via)
                    or not all(via)
                    or max(map(len, via)) > MAX_NAME
                    or self._machine in via
                )
            )
        ):
            self._malformed(request, context)
        assert flow is not None
        if request.digest != flow.digest:
            return  # the servicer refuses another version of the flow, saying so
        if index == 0:
            return  # a flow's entry: any caller that passed the token may start one
        self._entitled(flow, index, via, context, certified)

    def _malformed(self, request: _pb2.ContinueRequest, context: grpc.ServicerContext) -> NoReturn:
        """Refuse a call that is not one a peer makes, saying what is wrong with it."""
        me = self._machine
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        flow = self._flows.flows.get(request.request)
        if flow is None:
            self._refuse(
                context, grpc.StatusCode.NOT_FOUND, f"{me} has no flow {_cut(request.request)}"
            )
        index = request.line_index
        if index >= len(flow.lines):
            self._refuse(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"{me}: flow {flow.name} has {len(flow.lines)} lines, no line {index}",
            )
        if not request.flow_id:
            self._refuse(context, invalid, f"{me}: the call has no flow_id")
        if len(request.flow_id) > MAX_NAME:
            self._refuse(context, invalid, f"{me}: flow_id of {len(request.flow_id):,} characters")
        via = request.via
        if len(via) > len(flow.lines):
            self._refuse(
                context,
                invalid,
                f"{me}: a call chain (via) of {len(via)} machines is longer than flow"
                f" {flow.name} has lines ({len(flow.lines)})",
            )
        if me in via:
            self._refuse(
                context,
                invalid,
                f"{me}: the call chain (via) {_cut(' → '.join(via))} names {me} itself; a flow"
                f" never calls the machine it is on (it goes on there locally)",
            )
        self._refuse(
            context,
            invalid,
            f"{me}: the call chain (via) {_cut(' → '.join(via))} is not one a flow makes"
            " (a machine twice, or an empty or overlong name)",
        )

    def _entitled(
        self,
        flow: Flow,
        index: int,
        via: Sequence[str],
        context: grpc.ServicerContext,
        certified: frozenset[str] | None,
    ) -> None:
        """Refuse line ``index`` unless the caller owns line ``index - 1`` (the access list)."""
        me = self._machine
        owner = flow.lines[index - 1].machine
        caller = via[-1] if via else ""
        if certified is not None:
            allowed = owner in certified
            who = "certificate for " + ", ".join(sorted(certified))
        else:
            allowed = caller == owner
            who = caller or "a caller that names no machine"
        if not allowed:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{me}: {_name(who)} may not send {flow.name} line {index}"
                f" {flow.lines[index].text!r}: only {owner}, which runs line {index - 1},"
                " hands the flow on to it",
                caller=who,
                request=flow.name,
                line_index=index,
            )

    def _bounded(self, request: _pb2.ContinueRequest, reply: bytes) -> bytes:
        """The (serialized) reply, or a step failure when it would not fit in a message: gRPC
        would otherwise fail the call with RESOURCE_EXHAUSTED, which the caller reads as
        "busy"."""
        size = len(reply)
        if size <= self._limit:
            return reply
        steps = _pb2.ContinueReply.FromString(reply).steps
        last = steps[-1].line_index if steps else request.line_index
        flow = self._flows[request.request]
        message = str(
            step_error(
                request=flow.name,
                flow_id=request.flow_id,
                machine=self._machine,
                line=flow.lines[last].text,
                line_index=last,
                error_type="ContextError",
                detail=f"the context grew to a {size:,}-byte reply, over the {self._limit:,}-byte"
                " limit (max_message_bytes in mesh.toml)",
            )
        )
        _log.error("mesh.reply_too_large", size=size, limit=self._limit, request=request.request)
        failure = _pb2.Failure(
            kind=_pb2.Failure.STEP,
            machine=self._machine,
            line_index=last,
            error_type="ContextError",
            message=message,
        )
        return _pb2.ContinueReply(failed=failure).SerializeToString()  # type: ignore[no-any-return]

    def _refuse(
        self,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        **fields: Any,
    ) -> NoReturn:
        _log.warning(
            "mesh.refused",
            code=code.name,
            reason=message,
            peer=context.peer(),
            machine=self._machine,
            **fields,
        )
        context.abort(code, message)
        raise AssertionError("unreachable: abort raises")


def fingerprint(raw: bytes, certified: frozenset[str] | None) -> bytes:
    """What identifies one call for the reply record (mesh/dedup.py): a hash of its bytes
    (request, line, flow id, digest, the via chain and the context it carried) and, under
    mutual TLS, of the names in the caller's certificate. gRPC's retries resend the very
    same bytes from the same caller; anything else differs. Hashed once per call, here,
    where the raw bytes are at hand: SHA-256, whose second preimages are out of reach (and
    the fastest of hashlib's here, about a microsecond for a small call)."""
    digest = hashlib.sha256(raw)
    if certified:
        digest.update(b"\0" + "\0".join(sorted(certified)).encode("utf-8", "replace"))
    return digest.digest()


def _name(text: str) -> str:
    """A caller's name as is when it is short and printable, else quoted and cut."""
    return text if len(text) <= _SHOWN and text.isprintable() else _cut(text)


def _cut(text: str) -> str:
    """A caller's string, quoted and cut short enough for a status message and a log line."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}… ({len(text):,} characters)"
