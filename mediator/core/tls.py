"""Client TLS for broker connections, shared by the adapters that connect to brokers (stdlib ``ssl`` only)."""

from __future__ import annotations

import socket
import ssl

import structlog

from mediator.core.errors import ConfigError
from mediator.core.seams import BrokerTlsConfig


class BrokerSslContext(ssl.SSLContext):
    """A client context that can verify (and send as SNI) a name other than the host it connects to.

    Neither paho nor asyncio takes a server name apart from the host: both pass the host to
    ``wrap_socket`` / ``wrap_bio``, where ``server_hostname`` replaces it when set.
    """

    server_name: str | None = None

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )


def client_context(key: str, tls: BrokerTlsConfig | None) -> ssl.SSLContext:
    """The client TLS context of one broker, built once at build time: reading the CA and certificate
    files is a small one-time blocking read while the daemon starts (or reloads), before it serves.

    ``verify = false`` checks neither the certificate nor the name (a warning is logged). Raises
    ConfigError (file ``environment``: ``check`` may run where the files are not) naming ``key``.
    ``tls`` None: the system's trust store, the host verified.
    """
    tls = tls or BrokerTlsConfig()
    context = BrokerSslContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.server_name = tls.server_hostname
    try:
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=tls.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("environment", [f"{key}.ca_file: cannot load {tls.ca_file!r}: {exc}"]) from None
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "environment", [f"{key}.cert_file: cannot load {tls.cert_file!r} with {tls.key_file!r}: {exc}"]
            ) from None
    if not tls.verify:
        context.check_hostname = False  # before verify_mode: CERT_NONE refuses check_hostname
        context.verify_mode = ssl.CERT_NONE
        structlog.get_logger(__name__).warning(
            "broker.tls_unverified", key=key, reason="verify = false: the broker's certificate is not checked"
        )
    return context
