"""Authenticated party links: one key and one self-signed certificate per party, pinned by name.

Every party of a cluster (compute parties, the model owner, the data owner) holds a private key
and a certificate whose subject and DNS name are the party's name. The deployment file
(``deployment``) names each party's certificate (``cert``) and, on the machine of that party, its
key (``key``). Trust is *pinning*: a party trusts exactly the certificates the deployment names, and no certificate authority, so no party (nor whoever generated the keys)
can mint a certificate for another name that anyone accepts. The certificates are not CAs
(``CA:FALSE``): a party's key cannot sign a certificate that would chain to it.

- gRPC (node service): mutual TLS. A node's server accepts only clients that present one of the
  pinned certificates of the parties that may call it (``require_client_auth``) and then looks up
  which party that is (:func:`caller_of`, by the exact certificate bytes); a client accepts a
  node only if it presents the certificate pinned for the party it dialled
  (``ssl_target_name_override`` = that party's name, and only its certificate as the root).
- brpc (SPU's links between compute parties): TLS with client and server certificates verified
  against the compute parties' certificates only (:func:`link_ssl`).

- the watch port (SecretFlow jobs' heartbeats, Python ``ssl``): mutual TLS as gRPC's, with every
  party's pinned certificate as the server's trust roots and the dialled party's alone as the
  client's (:func:`watch_tls`).

``generate_keys`` makes the files (``secptune cluster keys``; ``LocalCluster`` does it for its
throwaway local cluster). It generates every party's key on one machine: for a cluster across
machines, each party should run ``secptune cluster keys --party NAME`` itself and send only its
certificate to the others.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

from ..errors import UserError

VALID_DAYS = 365


class KeyFileError(UserError):
    """A missing, unreadable or mismatched key or certificate."""


def _new_cert(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secptune party")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def generate_keys(names, out_dir) -> dict:
    """A key (mode 0600) and a self-signed certificate for each party name, in ``out_dir``:
    ``NAME.key`` and ``NAME.pem``. Returns ``{name: (cert_path, key_path)}``. An existing file is
    never overwritten (UserError): keys are identities, not caches."""
    import re

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    paths = {}
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise KeyFileError(f"party name {name!r} cannot name a certificate (letters, digits, _ . - only)")
        cert, key = out / f"{name}.pem", out / f"{name}.key"
        for p in (cert, key):
            if p.exists():
                raise KeyFileError(f"{p} already exists; keys are not overwritten (remove it or choose another --out)")
        cert_pem, key_pem = _new_cert(name)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert.write_bytes(cert_pem)
        paths[name] = (cert, key)
    return paths


# ----------------------------------------------------------------------------------- identities
@dataclasses.dataclass(frozen=True)
class Identity:
    """What one party's process uses on its links: its own name, certificate and key, and the
    pinned certificate of every party (``certs``: name -> PEM bytes)."""

    name: str
    cert: bytes
    key: bytes
    certs: dict

    def channel_credentials(self, target: str):
        """A client's credentials for dialling party ``target``: only its pinned certificate is
        trusted, and we present ours."""
        import grpc

        if target not in self.certs:
            raise KeyFileError(f"no certificate for party {target!r} in the deployment file")
        return grpc.ssl_channel_credentials(root_certificates=self.certs[target], private_key=self.key,
                                            certificate_chain=self.cert)

    def server_credentials(self, callers):
        """A node's server credentials: a client must present the pinned certificate of one of
        ``callers`` (party names)."""
        import grpc

        roots = b"".join(self.certs[c] for c in callers if c in self.certs)
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=roots,
                                           require_client_auth=True)


def _der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return data


def _check_pair(name: str, cert: bytes, key: bytes, cert_path: str, key_path: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        c = x509.load_pem_x509_certificate(cert)
    except ValueError:
        raise KeyFileError(f"party {name}'s certificate {cert_path} is not a PEM certificate") from None
    try:
        k = serialization.load_pem_private_key(key, None)
    except (ValueError, TypeError):
        raise KeyFileError(f"party {name}'s key {key_path} is not an unencrypted PEM private key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (k.public_key().public_bytes(serialization.Encoding.DER, pub)
            != c.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise KeyFileError(f"party {name}'s key {key_path} does not belong to its certificate {cert_path}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
        raise KeyFileError(f"party {name}'s certificate {cert_path} is not valid now "
                        f"({c.not_valid_before_utc:%Y-%m-%d} to {c.not_valid_after_utc:%Y-%m-%d})")


def with_local_keys(deployment, key_dir):
    """``deployment`` with a fresh key and certificate for every party in ``key_dir`` (a throwaway
    local cluster's or SecretFlow job's), unless it names certificates already."""
    if has_keys(deployment):
        return deployment
    paths = generate_keys([p.name for p in deployment.parties], key_dir)
    return dataclasses.replace(deployment, parties=tuple(
        dataclasses.replace(p, cert=str(paths[p.name][0]), key=str(paths[p.name][1])) for p in deployment.parties))


def pinned_bundle(deployment, names, path) -> Path:
    """The pinned certificates of parties ``names``, one PEM file (a brpc link's trust roots)."""
    path = Path(path)
    path.write_bytes(b"".join(Path(deployment.party(n).cert).read_bytes() for n in names))
    return path


def has_keys(deployment) -> bool:
    return all(p.cert for p in deployment.parties)


def identity(deployment, me: str) -> Identity:
    """Party ``me``'s identity under ``deployment``: its key must be readable here; every party's
    certificate is pinned. UserError (one line) naming what is missing."""
    parties = {p.name: p for p in deployment.parties}
    if not has_keys(deployment):
        missing = [p.name for p in parties.values() if not p.cert]
        raise KeyFileError(f"{deployment.source} names no certificate for {', '.join(missing)}: every link between "
                           "parties is authenticated; run `secptune cluster keys --cluster FILE --out DIR` and use the "
                           "deployment file it writes")
    if me not in parties:
        raise KeyFileError(f"party {me!r} is not in {deployment.source}")
    certs = {n: _read(p.cert, f"party {n}'s certificate") for n, p in parties.items()}
    ders = {}
    for n, pem in certs.items():
        try:
            d = _der(pem)
        except ValueError:
            raise KeyFileError(f"party {n}'s certificate {parties[n].cert} is not a PEM certificate") from None
        if d in ders:
            raise KeyFileError(f"parties {ders[d]} and {n} name the same certificate; each party needs its own")
        ders[d] = n
    p = parties[me]
    if not p.key:
        raise KeyFileError(f"{deployment.source} names no private key for party {me} (parties.{me}.key)")
    key = _read(deployment.key_of(me), f"party {me}'s private key")
    _check_pair(me, certs[me], key, p.cert, p.key)
    return Identity(me, certs[me], key, certs)


def caller_of(context, ident: Identity) -> str | None:
    """The party whose pinned certificate the gRPC client of ``context`` presented (None: none)."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        der = _der(pems[0])
    except ValueError:
        return None
    for name, pem in ident.certs.items():
        if _der(pem) == der:
            return name
    return None


# --------------------------------------------------------------------------------- brpc links
# brpc 1.11 (inside SPU 0.9.3; fixed in brpc 1.15) writes TLS through a 16 KB buffer and, when the
# socket is full at a message's last flush, keeps the rest there until its next write on that
# connection: the message never completes on its own. A short per-message timeout makes yacl's
# link send it again, and that write flushes it (the receiver drops the copy by sequence number).
BRPC_MESSAGE_TIMEOUT_S = 10.0
# the pieces a link message is cut into (yacl's default): the up to 8 in flight on one connection
# arrive within that timeout down to ~10 Mbit/s
BRPC_PIECE_BYTES = 1 << 20


def link_ssl(desc, deployment, me: str, out_dir) -> Path:
    """Turn on TLS for an SPU brpc link description: this party presents its certificate and
    verifies its peer's against the compute parties' pinned certificates (a file written to
    ``out_dir``). Returns that file."""
    compute = deployment.compute
    ident = identity(deployment, me)
    me_p = next(p for p in compute if p.name == me)
    roots = Path(out_dir) / f"link-peers-{me}.pem"
    roots.write_bytes(b"".join(ident.certs[p.name] for p in compute))
    desc.enable_ssl = True
    for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
        opts.cert.certificate_path = str(Path(me_p.cert).absolute())
        opts.cert.private_key_path = str(Path(me_p.key).absolute())
        opts.verify.ca_file_path = str(roots.absolute())
        opts.verify.verify_depth = 1
    return roots


# ------------------------------------------------------------------------- plain TCP links (ssl)
@dataclasses.dataclass(frozen=True)
class PinnedTLS:
    """Python ``ssl`` contexts of party ``me``: ``server`` wants a client certificate pinned for one
    of the parties; ``client(peer)`` trusts only ``peer``'s pinned certificate, under its name."""

    me: str
    server: object  # ssl.SSLContext
    clients: dict  # peer name -> ssl.SSLContext

    def client(self, peer: str):
        if peer not in self.clients:
            raise KeyFileError(f"no certificate for party {peer!r} in the deployment file")
        return self.clients[peer]


def watch_tls(deployment, me: str) -> PinnedTLS:
    """Mutual TLS for party ``me``'s watch port and its heartbeats to the others (``Watchdog``)."""
    ident = identity(deployment, me)
    return pinned_tls(me, deployment.party(me).cert, deployment.key_of(me), ident.certs)


def pinned_tls(me: str, cert_path, key_path, certs: dict) -> PinnedTLS:
    """:class:`PinnedTLS` of party ``me`` (its certificate and key files) among ``certs`` (every
    party's name -> pinned PEM certificate, its own included)."""
    import ssl

    def context(purpose, roots: bytes):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert_path), str(key_path))
        ctx.load_verify_locations(cadata=roots.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    server = context(ssl.PROTOCOL_TLS_SERVER, b"".join(certs.values()))
    server.num_tickets = 0  # no session resumption: nothing is written outside the heartbeats
    clients = {n: context(ssl.PROTOCOL_TLS_CLIENT, pem) for n, pem in certs.items() if n != me}
    return PinnedTLS(me, server, clients)


def check_peer(addr: str, ctx, name: str, timeout_s: float = 5.0) -> tuple:
    """Whether party ``name``'s TLS port ``addr`` (host:port) is that party: one handshake under
    ``ctx`` (this party's certificate; ``name``'s pinned one as the only root), then a short read
    for a refusal of this party's certificate (TLS 1.3 sends it after the client's handshake).

    Returns ``("ok", "")``; ``("wait", why)`` while nothing definite answers (refused, closed at
    once or silent: a party whose brpc is not listening yet looks the same); ``("wrong", why)``
    when what answers cannot be that party over TLS: not TLS, another certificate, or a refusal
    of this party's certificate."""
    import socket
    import ssl

    host, _, port = addr.rpartition(":")
    try:
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as e:
        return "wait", f"no connection ({e.strerror or type(e).__name__})"
    try:
        with ctx.wrap_socket(raw, server_hostname=name) as conn:
            conn.settimeout(min(1.0, timeout_s))
            try:
                conn.recv(1)  # a TLS peer that took our certificate says nothing until asked
            except (socket.timeout, ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
                pass
            return "ok", ""
    except ssl.SSLCertVerificationError as e:
        return "wrong", f"its certificate is not the one the deployment pins for {name} ({e.verify_message})"
    except ssl.SSLError as e:
        reason = (e.reason or str(e)).lower()
        if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or "eof" in reason:
            return "wait", "it closed the connection at the TLS handshake"
        if "alert" in reason:
            return "wrong", f"it refused this party's certificate (TLS alert: {reason.replace('_', ' ')})"
        return "wrong", f"it does not answer in TLS ({reason.replace('_', ' ')})"
    except OSError as e:  # a reset, a timeout: not up, or busy
        return "wait", f"no TLS handshake ({e.strerror or type(e).__name__})"
    finally:
        raw.close()
