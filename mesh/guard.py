"""Who may call a peer, and what: every admission check, for unary calls and link frames alike.

Every call a peer serves passes here before anything runs, whether it came as a unary
``Continue`` or as a request frame on a ``Link``, in this order:

1. **Token.** With a token configured (``token_file`` or ``$MESH_TOKEN``), a unary call,
   or the opening of a link, without ``authorization: Bearer <token>`` metadata, or with
   another token, is UNAUTHENTICATED.
2. **Shape.** The bytes must be a ``ContinueRequest`` naming a flow this peer knows and a
   line it has, with a ``flow_id`` and a call chain (``via``) that could be real: no longer
   than the flow has lines, no machine twice, not this machine (a flow never calls the
   machine it is on). Anything else is INVALID_ARGUMENT, NOT_FOUND or OUT_OF_RANGE with a
   short message (a request's own strings are cut, never echoed whole). An empty ``via`` is
   a caller from outside the mesh that names no machine; it may start a flow like any other.
3. **Version.** The call's ``digest`` must be this peer's digest of the request's rows:
   another version of the flow is FAILED_PRECONDITION, naming both digests.
4. **Access list.** Line 0 may come from any caller that got this far: it is a flow's entry.
   Line N > 0 only from the machine that owns line N-1, because that is the only machine that
   hands a flow on to line N (a hand-back travels in a reply, never as a call). In a flow
   with conditions (``When``, ``Each``), from the owner of any line that can run right
   before it on some path, and from anyone when every line before it may be skipped
   (``mesh.routing.predecessors``). Anything else
   is PERMISSION_DENIED, logged with the caller and the line; no handler runs.
5. **Owner.** The line must be this machine's: FAILED_PRECONDITION, naming its owner.
6. **Context.** A JSON object the mesh could send on as it is (no NaN, no lone surrogate,
   no number too large for a float): INVALID_ARGUMENT otherwise.

An admitted call comes with its :func:`fingerprint` (a hash of its bytes and of the caller's
certificate names), which the reply record keys retries by: only the very call that ran a
step gets its reply again (mesh/dedup.py).

Who the caller is: with mutual TLS, the machine names in its certificate (trusted: a CA
signed them), read once per unary call or per link. Without client certificates, the
machine the call names as the last of its ``via`` chain (trusted as far as the token is: a
token holder can claim any machine, so the access list then guards against mistakes and
stale flow files more than against a hostile token holder). The health service is not
guarded, so probes need no token; server reflection is behind the token
(:meth:`Guard.behind_token`).
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from mesh.flowfile import Flow, FlowSet
from mesh.routing import predecessors
from mesh.token import Token
from mesh.v1 import mesh_pb2 as _pb2
from mesh.versions import VERSION_MISMATCH, VersionStore
from mesh.wire import load_context, step_error

__all__ = ["CONTINUE", "Admitted", "Guard", "Refusal", "fingerprint"]

_log = structlog.get_logger("mesh")

CONTINUE = "/mesh.v1.Mesh/Continue"

#: Longest string of a request the guard will quote back in a message.
_SHOWN = 60
#: Longest flow_id or machine name a call may carry (an originator's flow_id is 32 hex digits).
MAX_NAME = 256

#: What a flow_id may be: 1 to MAX_NAME printable ASCII characters other than space. It is
#: in every log line of the flow, so it holds no line break or control character, and it
#: is the same length in characters, bytes and UTF-16 units, in any language.
_FLOW_ID = re.compile(rf"[!-~]{{1,{MAX_NAME}}}")


class Refusal(Exception):
    """A call the guard does not admit: the status it ends with, and why.

    ``fields`` go into the peer's ``mesh.refused`` log line (the caller, the line).
    """

    def __init__(self, code: grpc.StatusCode, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


@dataclass(frozen=True, slots=True)
class Admitted:
    """A call that passed every check: what the peer needs to serve it."""

    request: _pb2.ContinueRequest
    context: dict[str, Any]
    fingerprint: bytes
    #: The version of the request the call is for, when it is not the config's.
    flow: Flow | None = None
    raw: bytes | memoryview = b""  # the call as received (a durable stay journals it)


class Guard:
    """Admits or refuses each call of the mesh service (see the module docstring)."""

    def __init__(
        self,
        machine: str,
        flows: FlowSet,
        token: Token | None,
        max_message_bytes: int,
        *,
        tls: bool = False,
    ) -> None:
        self.machine = machine
        self._tls = tls  # this peer serves TLS, so callers may present certificates
        self._flows = flows
        self._token = token
        self.limit = max_message_bytes
        # The access list of flows with conditions: (digest, line) -> who may send it.
        self._owners: dict[tuple[str, int], Any] = {}
        #: Earlier versions of the flow files this machine served (durable meshes keep
        #: them beside the journal): a call for one of them is served on it.
        self.versions: VersionStore | None = None

    # -- once per unary call or link -------------------------------------------------

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Refuse a caller without the token (when one is configured)."""
        if self._token is not None and not self._token.matches(metadata):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED, f"{self.machine}: missing or wrong token"
            )

    def certified(self, context: Any) -> frozenset[str] | None:
        """The machine names in the caller's certificate; None when it presented none (or
        this peer serves no TLS, so there is nothing to ask gRPC about)."""
        if not self._tls:
            return None
        from mesh.credentials import peer_machines  # noqa: PLC0415 - only with TLS

        return peer_machines(context)

    def method_handlers(
        self, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> dict[str, grpc.RpcMethodHandler]:
        """``handlers`` (method name -> handler of mesh.v1.Mesh), each behind the token.

        ``Continue`` and ``Link`` check it themselves, with every other check; a method
        added to the service later gets the token check here, whatever kind it is (sync
        or ``async def``, unary or streaming).
        """
        return {
            name: handler if name in ("Continue", "Link") else self._token_only(handler)
            for name, handler in handlers.items()
        }

    def behind_token(
        self, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> dict[str, grpc.RpcMethodHandler]:
        """``handlers`` of another service (method name -> handler), each behind the token
        when one is configured: server reflection describes the mesh service to whoever
        may call it, and to nobody else."""
        return {name: self._token_only(handler) for name, handler in handlers.items()}

    def _token_only(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        attr, make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
        inner = getattr(handler, attr)
        checked: Any
        if inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner):

            async def refuse(context: Any, refusal: Refusal) -> None:
                self.log(refusal, context.peer())
                await context.abort(refusal.code, refusal.message)

            if inspect.isasyncgenfunction(inner):

                async def checked(request: Any, context: Any) -> Any:
                    try:
                        self.authenticate(context.invocation_metadata())
                    except Refusal as refusal:
                        await refuse(context, refusal)
                    async for item in inner(request, context):
                        yield item

            else:

                async def checked(request: Any, context: Any) -> Any:
                    try:
                        self.authenticate(context.invocation_metadata())
                    except Refusal as refusal:
                        await refuse(context, refusal)
                    return await inner(request, context)

        else:

            def checked(request: Any, context: Any) -> Any:
                try:
                    self.authenticate(context.invocation_metadata())
                except Refusal as refusal:
                    self.log(refusal, context.peer())
                    context.abort(refusal.code, refusal.message)
                return inner(request, context)

        return make(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- once per call ---------------------------------------------------------------

    def admit(self, raw: bytes | memoryview, certified: frozenset[str] | None) -> Admitted:
        """Every check of one call's bytes; its :class:`Admitted` form, or a :class:`Refusal`."""
        if len(raw) > self.limit:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.machine}: the call is {len(raw):,} bytes, larger than max"
                f" ({len(raw)} vs. {self.limit}) (max_message_bytes in its mesh.toml)",
            )
        request = self._decode(raw)
        flow = self._flows.flows.get(request.request)
        older = None
        if flow is not None and request.digest != flow.digest and self.versions is not None:
            older = self.versions.flow(request.request, request.digest)
            if older is not None:
                flow = older  # a flow that started on an earlier flow file finishes on it
        index = request.line_index
        flow_id = request.flow_id
        via = request.via
        # Every call passes here: one test for the shape of a real call, the reasons
        # worked out only for a call that fails it.
        if (
            flow is None
            or index >= len(flow.lines)
            or not _FLOW_ID.fullmatch(flow_id)
            or len(via) > len(flow.lines)
            or (
                via
                and (
                    len(set(via)) != len(via)
                    or not all(via)
                    or max(map(len, via)) > MAX_NAME
                    or self.machine in via
                )
            )
        ):
            raise self._malformed(request)
        assert flow is not None
        me = self.machine
        if request.digest != flow.digest:
            # Both digests, so a caller can tell which side is stale: a digest is no secret,
            # only a hash of rows the caller holds (docs/wire-protocol.md says how it is made).
            caller = via[-1] if via else "caller"
            theirs = f"has {_cut(request.digest)}" if request.digest else "has none"
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{me} {VERSION_MISMATCH} {flow.name} than {_name(caller)}:"
                f" {me} has digest {flow.digest}, the call {theirs} (mesh check prints a"
                " flow's digest)",
            )
        if index:  # line 0 is a flow's entry: any caller that passed the token may start one
            if flow.controlled:
                self._entitled_on_some_path(flow, index, via, certified)
            else:
                self._entitled(flow, index, via, certified)
        owner = flow.lines[index].machine
        if owner != me:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{me} does not run {flow.name} line {index} {flow.lines[index].text!r};"
                f" {owner} does",
            )
        try:
            context = load_context(request.context)
        except ValueError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{me}: bad context: {exc}") from None
        return Admitted(request, context, fingerprint(raw, certified), older, raw)

    def _decode(self, raw: bytes | memoryview) -> _pb2.ContinueRequest:
        try:
            request: _pb2.ContinueRequest = _pb2.ContinueRequest.FromString(raw)
            return request
        except (DecodeError, ValueError, TypeError) as exc:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.machine}: the call is not a mesh.v1.ContinueRequest"
                f" ({len(raw):,} bytes: {_cut(str(exc))})",
            ) from None

    def _malformed(self, request: _pb2.ContinueRequest) -> Refusal:
        """The refusal of a call that is not one a peer makes, saying what is wrong with it."""
        me = self.machine
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        flow = self._flows.flows.get(request.request)
        if flow is None:
            return Refusal(grpc.StatusCode.NOT_FOUND, f"{me} has no flow {_cut(request.request)}")
        index = request.line_index
        if index >= len(flow.lines):
            return Refusal(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{me}: flow {flow.name} has {len(flow.lines)} lines, no line {index}",
            )
        if not request.flow_id:
            return Refusal(invalid, f"{me}: the call has no flow_id")
        if len(request.flow_id) > MAX_NAME:
            return Refusal(invalid, f"{me}: flow_id of {len(request.flow_id):,} characters")
        if not _FLOW_ID.fullmatch(request.flow_id):
            return Refusal(
                invalid,
                f"{me}: flow_id {_cut(request.flow_id)} is not 1 to {MAX_NAME} printable ASCII"
                " characters without spaces",
            )
        via = request.via
        if len(via) > len(flow.lines):
            return Refusal(
                invalid,
                f"{me}: a call chain (via) of {len(via)} machines is longer than flow"
                f" {flow.name} has lines ({len(flow.lines)})",
            )
        if me in via:
            return Refusal(
                invalid,
                f"{me}: the call chain (via) {_cut(' → '.join(via))} names {me} itself; a flow"
                f" never calls the machine it is on (it goes on there locally)",
            )
        return Refusal(
            invalid,
            f"{me}: the call chain (via) {_cut(' → '.join(via))} is not one a flow makes"
            " (a machine twice, or an empty or overlong name)",
        )

    def _entitled(
        self, flow: Flow, index: int, via: Sequence[str], certified: frozenset[str] | None
    ) -> None:
        """Refuse line ``index`` unless the caller owns line ``index - 1`` (the access list)."""
        owner = flow.lines[index - 1].machine
        caller = via[-1] if via else ""
        if certified is not None:
            allowed = owner in certified
            who = "certificate for " + ", ".join(sorted(certified))
        else:
            allowed = caller == owner
            who = caller or "a caller that names no machine"
        if not allowed:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self.machine}: {_name(who)} may not send {flow.name} line {index}"
                f" {flow.lines[index].text!r}: only {owner}, which runs line {index - 1},"
                " hands the flow on to it",
                caller=who,
                request=flow.name,
                line_index=index,
            )

    def _entitled_on_some_path(
        self, flow: Flow, index: int, via: Sequence[str], certified: frozenset[str] | None
    ) -> None:
        """The access list of a flow with conditions, fan-out or sub-flows: line ``index``
        only from the owner of a line that can run right before it on some path (computed
        from the file, not from the context: mesh.routing.predecessors); from anyone when
        every line before it may be skipped, as line 0."""
        key = (flow.digest, index)
        owners = self._owners.get(key, self._owners)
        if owners is self._owners:  # computed once per line of each version of a flow
            owners = self._owners[key] = predecessors(flow, index)
        if owners is None:
            return
        caller = via[-1] if via else ""
        if certified is not None:
            allowed = not owners.isdisjoint(certified)
            who = "certificate for " + ", ".join(sorted(certified))
        else:
            allowed = caller in owners
            who = caller or "a caller that names no machine"
        if not allowed:
            names = " or ".join(sorted(owners))
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self.machine}: {_name(who)} may not send {flow.name} line {index}"
                f" {flow.lines[index].text!r}: no path of the flow file runs a line of"
                f" {_name(who)} right before it (only {names})",
                caller=who,
                request=flow.name,
                line_index=index,
            )

    # -- what leaves ---------------------------------------------------------------------

    def bounded(self, request: _pb2.ContinueRequest, reply: bytes, limit: int = 0) -> bytes:
        """The (serialized) reply, or a step failure when it would not fit in a message for
        the caller (``limit``, the caller's own when it said, else this peer's): sent, it
        would fail the call, or break the link, as over the limit."""
        theirs = bool(limit) and limit < self.limit
        limit = min(limit or self.limit, self.limit)
        size = len(reply)
        if size <= limit:
            return reply
        steps = _pb2.ContinueReply.FromString(reply).steps
        last = steps[-1].line_index if steps else request.line_index
        flow = self._flows[request.request]
        message = str(
            step_error(
                request=flow.name,
                flow_id=request.flow_id,
                machine=self.machine,
                line=flow.lines[last].text,
                line_index=last,
                error_type="ContextError",
                detail=(
                    f"the reply to the caller was {size:,} bytes, over the caller's"
                    f" {limit:,}-byte limit (max_message_bytes in its mesh.toml)"
                    if theirs
                    else f"the context grew to a {size:,}-byte reply, over the {limit:,}-byte"
                    " limit (max_message_bytes in mesh.toml)"
                ),
            )
        )
        _log.error("mesh.reply_too_large", size=size, limit=limit, request=request.request)
        failure = _pb2.Failure(
            kind=_pb2.Failure.STEP,
            machine=self.machine,
            line_index=last,
            error_type="ContextError",
            message=message,
        )
        return _pb2.ContinueReply(failed=failure).SerializeToString()  # type: ignore[no-any-return]

    def log(self, refusal: Refusal, peer: str) -> None:
        """Say on this peer what it refused, to whom."""
        _log.warning(
            "mesh.refused",
            code=refusal.code.name,
            reason=refusal.message,
            peer=peer,
            machine=self.machine,
            **refusal.fields,
        )


def fingerprint(raw: bytes | memoryview, certified: frozenset[str] | None) -> bytes:
    """What identifies one call for the reply record (mesh/dedup.py): a hash of its bytes
    (request, line, flow id, digest, the via chain and the context it carried) and, under
    mutual TLS, of the names in the caller's certificate. A resend is the very same bytes
    from the same caller; anything else differs. Hashed once per call, here, where the raw
    bytes are at hand: SHA-256, whose second preimages are out of reach (and the fastest of
    hashlib's here, about a microsecond for a small call)."""
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
