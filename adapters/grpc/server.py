"""One gRPC server per listener: the Mediator service, standard health checking and server reflection."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters.grpc.config import GrpcListenerConfig
from adapters.grpc.inbound import GrpcInbound, abort
from adapters.grpc.outbound import SubscriberHub
from mediator.core.envelope import Envelope
from mediator.core.seams import Runtime
from mediator.v1 import service_pb2, service_pb2_grpc
from mediator.v1.service_pb2 import PublishReply, SubscribeRequest

SERVICE_NAME: str = service_pb2.DESCRIPTOR.services_by_name["Mediator"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MediatorServicer(service_pb2_grpc.MediatorServicer):
    """Routes the three RPCs to the listener's inbound (if any) and subscriber hub."""

    def __init__(self, inbound: GrpcInbound | None, hub: SubscriberHub) -> None:
        self._inbound = inbound
        self._hub = hub

    async def Publish(self, request: Envelope, context: Any) -> PublishReply:
        if self._inbound is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "no gRPC inbound is configured on this listener")
        return await self._inbound.publish(request, context)

    # The handlers below use context.read/write (so they return None rather than an iterator, unlike the
    # generated base): an async generator cannot interrupt a write blocked by flow control.
    async def PublishStream(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        if self._inbound is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "no gRPC inbound is configured on this listener")
        await self._inbound.publish_stream(context)

    async def Subscribe(self, request: SubscribeRequest, context: Any) -> None:  # type: ignore[override]
        await self._hub.subscribe(request, context)


class GrpcListener:
    """A ``Service``: binds, serves until cancelled, then stops with ``grace_s`` for calls in flight.

    Health: ``listener:<name>`` (and the inbound and outbounds on it) are ready while the server is up.
    The gRPC health service reports "" and ``mediator.v1.Mediator`` SERVING when the whole daemon is
    ready (``rt.health.ready``), polled every ``health_poll_s``.
    """

    def __init__(self, name: str, cfg: GrpcListenerConfig, rt: Runtime, *, health_poll_s: float = 1.0) -> None:
        self.name = name
        self.cfg = cfg
        self.hub = SubscriberHub(name)
        self.inbound: GrpcInbound | None = None
        self.port: int | None = None  # the bound port, once started
        self.started = asyncio.Event()
        self._rt = rt
        self.health_poll_s = health_poll_s
        self._component = f"listener:{name}"
        self._log = structlog.get_logger(__name__).bind(listener=name, protocol="grpc")
        rt.health.register(self._component)

    def _components(self) -> list[str]:
        names = [self._component]
        if self.inbound is not None:
            names.append(f"inbound:{self.inbound.name}")
        names.extend(f"outbound:{o}" for o in self.hub.outbounds)
        return names

    async def run(self) -> None:
        cfg = self.cfg
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
            ]
        )
        service_pb2_grpc.add_MediatorServicer_to_server(MediatorServicer(self.inbound, self.hub), server)
        health_servicer = health.aio.HealthServicer()
        # The servicer starts with "" SERVING; nothing is known yet, so say NOT_SERVING until the first poll.
        await health_servicer.set(health.OVERALL_HEALTH, _NOT_SERVING)
        await health_servicer.set(SERVICE_NAME, _NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if cfg.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        try:
            port = server.add_insecure_port(address)
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
            self._log.info("listener.started", host=cfg.host, port=port)
            self.started.set()
            while True:
                ready = self._rt.health.ready
                if ready != serving:
                    status = _SERVING if ready else _NOT_SERVING
                    await health_servicer.set(health.OVERALL_HEALTH, status)
                    await health_servicer.set(SERVICE_NAME, status)
                    serving = ready
                await asyncio.sleep(self.health_poll_s)
        finally:
            self.started.clear()
            for component in self._components():
                self._rt.health.set(component, False, "stopped")
            self.hub.close("listener shutting down")
            await health_servicer.enter_graceful_shutdown()
            await server.stop(cfg.grace_s)
            self._log.info("listener.stopped")
