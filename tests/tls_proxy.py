"""A TLS front for a plaintext Kafka broker in tests: terminates TLS (optionally requiring a
client certificate signed by the test CA) and forwards bytes to the broker, which advertises
the proxy's address so every connection a client makes goes through TLS.

tansu 0.6.0 has a `--cert` option but refuses `--key` with it, and its TLS listener drops
connections (ENVIRONMENT.md); a real cluster (MSK, Confluent Cloud) terminates TLS itself.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name,
          signer: rsa.RSAPrivateKey, *, ca: bool = False,
          dns: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: rsa.RSAPrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
    return path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for `localhost`, a client certificate, another CA."""
    ca_key, other_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "millrace test CA")])
    ca = _cert("millrace test CA", ca_key, ca_name, ca_key, ca=True)
    other = _cert("someone else", other_key, x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "someone else")]), other_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("localhost", server_key, ca_name, ca_key, dns="localhost")
    client = _cert("millrace-client", client_key, ca_name, ca_key)
    server_path = _write(directory / "server.pem", server, server_key)
    client_path = _write(directory / "client.pem", client, client_key)
    return Pki(ca=_write(directory / "ca.pem", ca), server_cert=server_path,
               server_key=server_path.with_suffix(".key"), client_cert=client_path,
               client_key=client_path.with_suffix(".key"),
               other_ca=_write(directory / "other-ca.pem", other))


class TlsProxy:
    """Listens on `port` with TLS and pipes each connection to 127.0.0.1:`upstream`."""

    def __init__(self, port: int, upstream: int, pki: Pki, *, require_client_cert: bool) -> None:
        self.upstream = upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(pki.ca)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.refused = 0  # handshakes that failed (no or untrusted client certificate)
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            raw.close()
            return
        broker = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=_pipe, args=(broker, client), daemon=True).start()
        _pipe(client, broker)

    def close(self) -> None:
        self._closing.set()
        self.listener.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, target):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
