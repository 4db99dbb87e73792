"""One gRPC server per listener: the Mediator service, standard health checking and server reflection,
over TLS (optionally mutual) when the listener has a ``tls`` section."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters.grpc.codec import Undecodable, lenient, rejected_trailers, status_for
from adapters.grpc.config import GrpcListenerConfig
from adapters.grpc.inbound import GrpcInbound, abort, origin_of
from adapters.grpc.outbound import SubscriberHub
from adapters.grpc.status import to_message
from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, Rejected
from mediator.core.seams import Runtime, TlsConfig
from mediator.v1 import service_pb2, service_pb2_grpc
from mediator.v1.service_pb2 import EventStatus, PublishAck, PublishReply, StatusRequest, SubscribeRequest

SERVICE_NAME: str = service_pb2.DESCRIPTOR.services_by_name["Mediator"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_DENIED = grpc.StatusCode.PERMISSION_DENIED


class MediatorServicer(service_pb2_grpc.MediatorServicer):
    """Routes the four RPCs to the listener's inbound (if any) and subscriber hub."""

    def __init__(
        self,
        inbound: GrpcInbound | None,
        hub: SubscriberHub,
        admit_subscriber: Callable[[Any], Awaitable[None]] | None = None,
        get_status: Callable[[StatusRequest, Any], Awaitable[EventStatus]] | None = None,
    ) -> None:
        self._inbound = inbound
        self._hub = hub
        self._admit_subscriber = admit_subscriber
        self._get_status = get_status

    async def GetStatus(self, request: StatusRequest | Undecodable, context: Any) -> EventStatus:
        if self._get_status is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "delivery status is not served here")
        if isinstance(request, Undecodable):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await self._get_status(request, context)

    async def Publish(self, request: Envelope | Undecodable, context: Any) -> PublishReply:
        if self._inbound is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "no gRPC inbound is configured on this listener")
        return await self._inbound.publish(request, context)

    async def Request(self, request: Envelope | Undecodable, context: Any) -> Envelope:
        if self._inbound is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "no gRPC inbound is configured on this listener")
        return await self._inbound.request(request, context)

    # The handlers below use context.read/write (so they return None rather than an iterator, unlike the
    # generated base): an async generator cannot interrupt a write blocked by flow control.
    async def PublishStream(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        if self._inbound is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "no gRPC inbound is configured on this listener")
        await self._inbound.publish_stream(context)

    async def Subscribe(self, request: SubscribeRequest | Undecodable, context: Any) -> None:  # type: ignore[override]
        if self._admit_subscriber is not None:
            await self._admit_subscriber(context)
        if isinstance(request, Undecodable):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        await self._hub.subscribe(request, context)


def add_mediator_service(servicer: MediatorServicer, server: Any) -> None:
    """``service_pb2_grpc.add_MediatorServicer_to_server`` with ``lenient`` request deserializers: a
    request whose bytes do not decode reaches the handler as an ``Undecodable`` (INVALID_ARGUMENT with a
    clear message; in PublishStream a refused ack, and the stream goes on) instead of grpcio's UNKNOWN
    "Unexpected DecodeError" before any of our code runs."""
    handlers = {
        "Publish": grpc.unary_unary_rpc_method_handler(
            servicer.Publish,
            request_deserializer=lenient(Envelope),
            response_serializer=PublishReply.SerializeToString,
        ),
        "PublishStream": grpc.stream_stream_rpc_method_handler(
            servicer.PublishStream,
            request_deserializer=lenient(Envelope),
            response_serializer=PublishAck.SerializeToString,
        ),
        "Request": grpc.unary_unary_rpc_method_handler(
            servicer.Request,
            request_deserializer=lenient(Envelope),
            response_serializer=Envelope.SerializeToString,
        ),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe,
            request_deserializer=lenient(SubscribeRequest),
            response_serializer=Envelope.SerializeToString,
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus,
            request_deserializer=lenient(StatusRequest),
            response_serializer=EventStatus.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class ServerCertificates:
    """The certificate (and client CA) a TLS listener serves, replaceable while it runs.

    grpc's dynamic server credentials ask ``fetch`` for a new configuration before every TLS handshake,
    on a grpc-core thread; an established connection keeps the certificate it began with. ``fetch``
    does no I/O: ``load`` (blocking, run it on a thread) reads and checks the files, ``stage`` hands the
    result to the next handshake. A load that fails leaves the served certificate as it was.
    """

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self.generation = 0  # certificates staged so far (1 once started)
        self.failures = 0  # reloads refused
        self._lock = threading.Lock()  # fetch runs on grpc-core's threads, stage on the event loop's
        self._pending: Any = None  # grpc.ServerCertificateConfiguration | None

    def load(self) -> tuple[Any, str]:
        """Read and check the files: the configuration for grpc and the leaf certificate's expiry (ISO 8601).
        Raises ``OSError`` (unreadable) or ``ValueError`` (not PEM, no certificate, the key does not match
        the certificate, an encrypted key). Blocking."""
        tls = self.tls
        chain_pem = Path(tls.cert_file).read_bytes()
        key_pem = Path(tls.key_file).read_bytes()
        ca_pem = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
            if ca_pem is not None:
                x509.load_pem_x509_certificates(ca_pem)
        except TypeError as exc:  # an encrypted key, or a key type TLS cannot use
            raise ValueError(f"{tls.key_file}: {exc}") from exc
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
            raise ValueError(f"{tls.key_file} is not the key of the first certificate in {tls.cert_file}")
        config = grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)], root_certificates=ca_pem)
        return config, chain[0].not_valid_after_utc.isoformat()

    def credentials(self, initial: Any) -> grpc.ServerCredentials:
        # require_client_authentication=True is GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY:
        # a client without a certificate, or with one that does not chain to the client CA, fails the
        # handshake. False never asks for one ("optional" is refused by the config for that reason).
        return grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=self.tls.client_cert == "required"
        )

    def begin(self) -> None:
        """A server starts with the configuration just loaded (in its credentials): nothing is pending."""
        with self._lock:
            self._pending = None
            self.generation += 1

    def stage(self, config: Any) -> None:
        """Serve ``config`` from the next handshake on."""
        with self._lock:
            self._pending = config
            self.generation += 1

    def fetch(self) -> Any:
        """grpc-core's certificate fetcher: the staged configuration once, then None ("unchanged")."""
        with self._lock:
            config, self._pending = self._pending, None
        return config


class GrpcListener:
    """A ``Service``: binds, serves until cancelled, then stops with ``grace_s`` for calls in flight.

    Health: ``listener:<name>`` (and the inbound and outbounds on it) are ready while the server is up.
    The gRPC health service reports "" and ``mediator.v1.Mediator`` SERVING when the whole daemon is
    ready (``rt.health.ready``), polled every ``health_poll_s``.

    With ``tls``, the certificate files are read at start (unreadable ones fail the start with a
    ``ConfigError``) and again whenever the daemon runs its reload hooks (SIGHUP), on a thread; a reload
    that fails logs ``tls.reload_failed`` and keeps serving the previous certificate.
    """

    def __init__(self, name: str, cfg: GrpcListenerConfig, rt: Runtime, *, health_poll_s: float = 1.0) -> None:
        self.name = name
        self.cfg = cfg
        self.hub = SubscriberHub(name)
        self.inbound: GrpcInbound | None = None
        self.status = rt.status  # GetStatus (a worker of workers = N swaps in its fleet's)
        self.port: int | None = None  # the bound port, once started
        self.started = asyncio.Event()
        self._rt = rt
        self.health_poll_s = health_poll_s
        self._component = f"listener:{name}"
        self._log = structlog.get_logger(__name__).bind(listener=name, protocol="grpc")
        self.certificates = ServerCertificates(cfg.tls) if cfg.tls is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_wanted = asyncio.Event()
        rt.health.register(self._component)
        if self.certificates is not None:
            rt.reload_hooks.append(self.request_reload)

    def request_reload(self) -> None:
        """The reload hook: re-read the TLS files soon (on the listener's loop, the reading on a thread).
        Safe from any thread; does nothing while the listener is not running (a start reads them anyway)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._reload_wanted.set)

    async def reload_certificates(self) -> bool:
        """Read the TLS files again and serve them from the next handshake on; False (logged as
        ``tls.reload_failed``, the previous certificate still served) if they cannot be used."""
        certificates = self.certificates
        if certificates is None:
            return False
        try:
            config, expires = await asyncio.to_thread(certificates.load)
        except Exception as exc:  # whatever went wrong, the certificate in use stays
            certificates.failures += 1
            self._log.error("tls.reload_failed", cert_file=certificates.tls.cert_file, error=str(exc))
            return False
        certificates.stage(config)
        self._log.info("tls.reloaded", cert_file=certificates.tls.cert_file, not_after=expires)
        return True

    async def _reloads(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self.reload_certificates()

    async def _credentials(self) -> grpc.ServerCredentials | None:
        """The server credentials (None: plaintext), the files read off the loop."""
        certificates = self.certificates
        if certificates is None:
            return None
        try:
            initial, expires = await asyncio.to_thread(certificates.load)
        except (OSError, ValueError) as exc:
            self._rt.health.set(self._component, False, "TLS certificate unusable")
            raise ConfigError(certificates.tls.cert_file, [f"listeners.{self.name}.tls: {exc}"]) from exc
        certificates.begin()
        self._log.info("tls.loaded", cert_file=certificates.tls.cert_file, not_after=expires)
        return certificates.credentials(initial)

    async def _admit_subscriber(self, context: Any) -> None:
        """On a listener with ``auth``, a Subscribe stream reads events out: its caller must be a verified
        principal of the listener's authenticators (anonymous callers and bad credentials: UNAUTHENTICATED)."""
        origin = origin_of(
            context, f"listener:{self.name}", self._rt.credential_headers, certificates=self.cfg.tls is not None
        )
        try:
            principal = await self._rt.sink.authenticate(origin)
        except Rejected as exc:
            await abort(context, status_for(exc.code), exc.reason, rejected_trailers(exc))
        if principal.anonymous:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "Subscribe needs credentials on this listener")

    async def _status_of(self, request: StatusRequest, context: Any) -> EventStatus:
        """``GetStatus``: the caller is authenticated by the authenticators of the inbound that took the
        event (this listener's for an event not known here); only its publisher or an admin reads it."""
        status = self.status
        assert status is not None
        found = await status.lookup(request.id)
        inbound = found.inbound if found.found == "known" and found.inbound else self._component
        origin = origin_of(context, inbound, self._rt.credential_headers, certificates=self.cfg.tls is not None)
        try:
            principal = await self._rt.sink.authenticate(origin)
        except Rejected as exc:
            await abort(context, status_for(exc.code), exc.reason, rejected_trailers(exc))
        owner = found.principal
        if owner and owner != principal.id and not principal.roles & self._rt.admin_roles:
            if principal.anonymous:
                await abort(
                    context, grpc.StatusCode.UNAUTHENTICATED, "this event's status needs its publisher's credential"
                )
            await abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "only the event's publisher or an admin may read it"
            )
        if found.document is None:
            if found.found == "expired":
                detail = (
                    f"the delivery status of event {request.id!r} expired (kept {status.window_s:g} s after delivery)"
                )
            else:
                detail = f"no event {request.id!r} is known here (never accepted, or its status expired long ago)"
            await abort(context, grpc.StatusCode.NOT_FOUND, detail)
        return to_message(found.document)

    def _components(self) -> list[str]:
        names = [self._component]
        if self.inbound is not None:
            names.append(f"inbound:{self.inbound.name}")
        names.extend(f"outbound:{o}" for o in self.hub.outbounds)
        return names

    async def run(self) -> None:
        cfg = self.cfg
        server = grpc.aio.server(options=cfg.server_options())
        admit = self._admit_subscriber if cfg.auth else None
        getter = self._status_of if self.status is not None else None
        add_mediator_service(MediatorServicer(self.inbound, self.hub, admit, getter), server)
        health_servicer = health.aio.HealthServicer()
        # The servicer starts with "" SERVING; nothing is known yet, so say NOT_SERVING until the first poll.
        await health_servicer.set(health.OVERALL_HEALTH, _NOT_SERVING)
        await health_servicer.set(SERVICE_NAME, _NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if cfg.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        credentials = await self._credentials()
        try:
            port = (
                server.add_insecure_port(address)
                if credentials is None
                else server.add_secure_port(address, credentials)
            )
        except RuntimeError as exc:  # grpcio >= 1.50 raises instead of returning 0
            port = 0
            reason = str(exc)
        else:
            reason = "address unavailable"
        if not port:
            self._rt.health.set(self._component, False, f"cannot bind {address}")
            raise OSError(f"gRPC listener {self.name!r} cannot bind {address}: {reason}")
        serving = False
        try:
            await server.start()
            self.port = port
            for component in self._components():
                self._rt.health.set(component, True, f"listening on {cfg.host}:{port}")
            self._log.info("listener.started", host=cfg.host, port=port, tls=credentials is not None)
            self.started.set()
            async with asyncio.TaskGroup() as tasks:
                if self.certificates is not None:
                    self._loop = asyncio.get_running_loop()
                    tasks.create_task(self._reloads(), name=f"listener:{self.name}:tls-reload")
                while True:
                    ready = self._rt.health.ready
                    if ready != serving:
                        status = _SERVING if ready else _NOT_SERVING
                        await health_servicer.set(health.OVERALL_HEALTH, status)
                        await health_servicer.set(SERVICE_NAME, status)
                        serving = ready
                    await asyncio.sleep(self.health_poll_s)
        finally:
            self._loop = None
            self.started.clear()
            for component in self._components():
                self._rt.health.set(component, False, "stopped")
            self.hub.close("listener shutting down")
            await health_servicer.enter_graceful_shutdown()
            await server.stop(cfg.grace_s)
            self._log.info("listener.stopped")
