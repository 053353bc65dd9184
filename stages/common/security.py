"""CurveZMQ on pagepipe's tcp links: key files, allow-lists, and a gatekeeper that bounds connections.

Roles follow bind/connect: the end that binds is the CURVE *server* (its own
key pair, ``secret-key=``, and an allow-list of client public keys,
``authorized-keys=DIR``); the end that connects is the CURVE *client* (its own
key pair and the server's public key, ``server-key=``). So both ends are
authenticated: the client knows whom it talks to, the server whom it lets in.
Key files are ZeroMQ certificates (``zmq.auth.create_certificates``), written
by ``pagepipe keygen DIR``: ``NAME.key`` (public, to hand out) and
``NAME.key_secret`` (both keys, mode 0600).

A tcp endpoint without keys is refused (ConfigError) unless ``insecure=true``
says so in so many words; ipc:// and inproc:// links (private directories of one
pipeline) need none.

The ``Gatekeeper`` of a bound socket answers ZeroMQ's ZAP requests (a peer whose
key is not on the allow-list is refused before any of its messages is read)
and watches the socket's monitor: connections beyond ``max-connections`` are shut
down at accept, before their handshake, so memory held by peers stays below
``max-connections x max-message`` plus the queued messages of authenticated
peers (docs/SECURITY.md). Refusals are counted and queued as warnings that the
owning stage posts on the bus (``take_warnings``; a thread must not post).
"""
from __future__ import annotations

import logging
import os
import socket as pysocket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import zmq
import zmq.auth

from pipeline.errors import ConfigError, TransportError
from pipeline.stage import Property

KEYGEN_HINT = "make a key pair with `pagepipe keygen DIR` (docs/SECURITY.md)"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"pagepipe"
HANDSHAKE_SECONDS = 10
"""A peer that has not completed its handshake by then is dropped (bounds how long it holds memory)."""
IO_THREADS = 2
"""I/O threads of a context that carries CURVE: encryption runs in them, so one would cap it at one core."""
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
REPORT_SECONDS = 10.0
"""Each kind of refusal (a failed handshake, an unknown key, a dropped connection) is warned about at once, then
at most this often with a count: a refused peer that keeps reconnecting does not flood the bus."""
_EVENT = struct.Struct("=HI")
_log = logging.getLogger("pagepipe.security")


def is_network(endpoint: str) -> bool:
    """True for endpoints other hosts or users can reach (tcp, and anything not ipc/inproc)."""
    return not endpoint.lstrip("@>").startswith(("ipc://", "inproc://"))


def write_keypair(directory: str | os.PathLike, name: str = "pagepipe") -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; refuse to overwrite."""
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"keygen: {name!r} is not a plain file name")
    for existing in (public, secret):
        if existing.exists():
            raise ConfigError(f"keygen: {existing} exists; remove it or choose another name")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        old = os.umask(0o077)          # the secret file is never readable by others, not even for a moment
        try:
            made_public, made_secret = zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old)
        os.chmod(made_public, 0o644)
    except OSError as exc:
        raise ConfigError(f"keygen: cannot write keys in {directory}: {exc.strerror}") from None
    return Path(made_public), Path(made_secret)


def load_key(path: str, *, secret: bool, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a certificate file; ConfigError naming ``what`` and the file."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read a key from {path} ({exc}); {KEYGEN_HINT}") from None
    for key in (public, secret_key):
        if key is not None and not _valid_z85_key(key):
            raise ConfigError(f"{what}: {path} holds a malformed key (expected 40 Z85 characters)")
    if secret and secret_key is None:
        raise ConfigError(f"{what}: {path} holds no secret key (give the .key_secret file)")
    if secret and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning("%s: secret key file %s is readable by other users", what, path)
    return public, secret_key


def load_allowed(directory: str, what: str) -> frozenset[bytes]:
    """The public keys of every ``*.key`` certificate in ``directory`` (the allow-list)."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{what}: authorized-keys={directory} is not a directory of public key files")
    keys = {load_key(str(path), secret=False, what=what)[0] for path in sorted(Path(directory).glob("*.key"))}
    if not keys:
        raise ConfigError(f"{what}: authorized-keys={directory} holds no *.key file: nobody could connect")
    return frozenset(keys)


def _valid_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(zmq.utils.z85.decode(key)) == 32
    except (ValueError, KeyError, struct.error):
        return False


@dataclass(frozen=True)
class LinkSecurity:
    """What one end of a link needs: nothing (ipc, or insecure), or its CURVE keys and role."""

    where: str
    server: bool = False
    public: bytes | None = None
    secret: bytes | None = None
    server_key: bytes | None = None
    allowed: frozenset[bytes] = frozenset()
    max_connections: int = 0
    """0: no limit (ipc links)."""

    @property
    def curve(self) -> bool:
        return self.secret is not None

    def context(self) -> zmq.Context:
        """A context with enough I/O threads for this link."""
        return zmq.Context(io_threads=IO_THREADS if self.curve else 1)

    def apply(self, socket: zmq.Socket) -> "Gatekeeper | None":
        """Set the CURVE options on ``socket`` (before bind/connect); start the gatekeeper of a server.

        The gatekeeper must run before the socket binds: ZeroMQ asks it about every peer.
        """
        gatekeeper = None
        if self.server and (self.curve or self.max_connections):
            gatekeeper = Gatekeeper(socket, self.allowed if self.curve else None, self.max_connections, self.where)
        if self.curve:
            socket.curve_secretkey = self.secret
            socket.curve_publickey = self.public
            if self.server:
                socket.zap_domain = ZAP_DOMAIN
                socket.curve_server = True
            else:
                socket.curve_serverkey = self.server_key
            socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_SECONDS * 1000)
        return gatekeeper


def link_security(where: str, endpoint: str, bind: bool, *, secret_key: str = "", public_key: str = "",
                  server_key: str = "", authorized_keys: str = "", insecure: bool = False,
                  max_connections: int = 0) -> LinkSecurity:
    """Check one end's key settings against its endpoint and role; ConfigError saying how to fix them."""
    given = [name for name, value in (("secret-key", secret_key), ("public-key", public_key),
                                      ("server-key", server_key), ("authorized-keys", authorized_keys)) if value]
    network = is_network(endpoint)
    if insecure and given:
        raise ConfigError(f"{where}: insecure=true and {', '.join(given)} contradict each other; drop one")
    limit = max_connections if network else 0
    if not given:
        if network and not insecure:
            role = ("secret-key=DIR/NAME.key_secret authorized-keys=DIR-OF-CLIENT-KEYS" if bind
                    else "secret-key=DIR/NAME.key_secret server-key=DIR/SERVER.key")
            raise ConfigError(f"{where}: {endpoint} is a network endpoint and would carry memory unauthenticated "
                              f"and unencrypted: give {role} ({KEYGEN_HINT}), or insecure=true to accept that")
        return LinkSecurity(where, server=bind, max_connections=limit)
    if not secret_key:
        raise ConfigError(f"{where}: {', '.join(given)} given without secret-key= (this end's own key pair); "
                          f"{KEYGEN_HINT}")
    public, secret = load_key(secret_key, secret=True, what=where)
    if public_key and load_key(public_key, secret=False, what=where)[0] != public:
        raise ConfigError(f"{where}: public-key={public_key} is not the public half of secret-key={secret_key}")
    if bind:
        if server_key:
            raise ConfigError(f"{where}: server-key= is for the end that connects; this end binds {endpoint} "
                              f"(it is the server: give authorized-keys=DIR instead)")
        if not authorized_keys:
            raise ConfigError(f"{where}: binding {endpoint} with keys needs authorized-keys=DIR (the public keys "
                              f"of the peers allowed in)")
        return LinkSecurity(where, True, public, secret, allowed=load_allowed(authorized_keys, where),
                            max_connections=limit)
    if authorized_keys:
        raise ConfigError(f"{where}: authorized-keys= is for the end that binds; this end connects to {endpoint} "
                          f"(give server-key=FILE, the public key of the end that binds)")
    if not server_key:
        raise ConfigError(f"{where}: connecting to {endpoint} with keys needs server-key=FILE (the public key of "
                          f"the end that binds)")
    return LinkSecurity(where, False, public, secret, server_key=load_key(server_key, secret=False, what=where)[0])


class KeyOptions(TypedDict, total=False):
    """Key settings of one end, as keyword arguments (``link_security``, AckListener, AckSender, the stages)."""

    secret_key: str
    public_key: str
    server_key: str
    authorized_keys: str
    insecure: bool


@dataclass(frozen=True)
class StreamKeys:
    """Key pairs of one sender and one receiver, each end's allow-list holding the other's public key.

    The receiver's zmq-src binds the data link and the sender's ack listener binds the ack link, so
    each is the server of one link and the client of the other. ``create`` makes throwaway keys
    (the demo, examples, tests); real deployments make theirs with ``pagepipe keygen``.
    """

    sender_secret: str
    sender_public: str
    receiver_secret: str
    receiver_public: str
    sender_allows: str      # directory holding the receiver's public key
    receiver_allows: str    # directory holding the sender's public key

    @classmethod
    def create(cls, directory: str | os.PathLike) -> "StreamKeys":
        """Throwaway keys in ``directory`` (made on first use, read back after)."""
        directory = Path(directory)
        keys = cls(*(str(directory / name) for name in (
            "sender/sender.key_secret", "sender/sender.key", "receiver/receiver.key_secret",
            "receiver/receiver.key", "sender-allows", "receiver-allows")))
        if Path(keys.sender_secret).exists():
            return keys
        sender_public, _ = write_keypair(directory / "sender", "sender")
        receiver_public, _ = write_keypair(directory / "receiver", "receiver")
        for allow_list, public in ((keys.sender_allows, receiver_public), (keys.receiver_allows, sender_public)):
            Path(allow_list).mkdir(mode=0o700)
            (Path(allow_list) / public.name).write_bytes(public.read_bytes())
        return keys

    @staticmethod
    def words(properties: KeyOptions) -> str:
        """Properties as launch-line words (``secret-key=... server-key=...``)."""
        return " ".join(f"{name.replace('_', '-')}={value}" for name, value in properties.items())

    def receiver_source(self) -> KeyOptions:
        """zmq-src, binding the data link."""
        return {"secret_key": self.receiver_secret, "authorized_keys": self.receiver_allows}

    def sender_sink(self) -> KeyOptions:
        """zmq-sink, connecting to the receiver."""
        return {"secret_key": self.sender_secret, "server_key": self.receiver_public}

    def sender_acks(self) -> KeyOptions:
        """The sender's ack listener (process-src ack-endpoint=, AckListener), binding the ack link."""
        return {"secret_key": self.sender_secret, "authorized_keys": self.sender_allows}

    def receiver_acks(self) -> KeyOptions:
        """replica-sink's ack channel, connecting to the sender."""
        return {"secret_key": self.receiver_secret, "server_key": self.sender_public}


class CurveProperties:
    """The key properties of a stage with one network link (mixed into the stage class)."""

    secret_key = Property("str", "", "This end's key pair (NAME.key_secret from `pagepipe keygen`); needed on tcp")
    public_key = Property("str", "", "This end's public key file (optional: checked against secret-key)")
    server_key = Property("str", "", "Connecting end: the public key file of the end that binds")
    authorized_keys = Property("str", "", "Binding end: directory of the public keys (*.key) allowed to connect")
    insecure = Property("bool", False, "Allow a tcp link without authentication or encryption (anyone who can "
                        "reach the port can read and inject checkpoints)")
    max_connections = Property("int", 4, "Binding end: connections held at once; more are dropped at accept "
                               "(bounds the memory peers can hold)", minimum=1, maximum=1024)

    def link_security(self, endpoint: str, bind: bool) -> LinkSecurity:
        where = getattr(self, "name", "") or getattr(self, "factory_name", "link")
        return link_security(where, endpoint, bind, secret_key=self.secret_key, public_key=self.public_key,
                             server_key=self.server_key, authorized_keys=self.authorized_keys,
                             insecure=self.insecure, max_connections=self.max_connections)


class Gatekeeper:
    """ZAP handler and connection limit of one bound socket, on a thread of its own.

    ``allowed`` None: no CURVE (ipc or insecure), only the connection limit applies.
    """

    def __init__(self, guarded: zmq.Socket, allowed: frozenset[bytes] | None, max_connections: int, where: str):
        self.where = where
        self.allowed = allowed
        self.max_connections = max_connections
        self.counters = {"peers_admitted": 0, "peers_refused": 0, "connections_dropped": 0, "handshakes_failed": 0}
        self._reports: dict[str, tuple[int, float]] = {}   # kind -> (refusals since the last warning, its time)
        self._open: set[int] = set()
        self._warnings: list[str] = []
        self._lock = threading.Lock()
        context = guarded.context
        self._zap = None
        if allowed is not None:
            self._zap = context.socket(zmq.REP)
            self._zap.linger = 0
            try:
                self._zap.bind(ZAP_ENDPOINT)
            except zmq.ZMQError as exc:
                self._zap.close()
                raise TransportError(f"{where}: cannot start the ZAP authenticator ({exc}): one per context") from None
        self._monitor = guarded.get_monitor_socket(_MONITOR_EVENTS) if max_connections else None
        self._guarded = guarded
        self._stop_address = f"inproc://pagepipe-gatekeeper-{id(self)}"
        self._stop_receiver = context.socket(zmq.PAIR)
        self._stop_receiver.bind(self._stop_address)
        self._stop_sender = context.socket(zmq.PAIR)
        self._stop_sender.connect(self._stop_address)
        self._thread = threading.Thread(target=self._run, name=f"gatekeeper-{where}", daemon=True)
        self._thread.start()

    def take_warnings(self) -> list[str]:
        """Refusals since the last call, for the owning stage to post on the bus."""
        with self._lock:
            taken, self._warnings = self._warnings, []
        return taken

    def _warn(self, text: str) -> None:
        _log.info("%s", text)
        with self._lock:
            self._warnings.append(text)
            del self._warnings[:-100]      # a flood of refusals keeps the last hundred

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self._zap, self._monitor, self._stop_receiver):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_receiver in ready:
                return
            if self._monitor in ready:
                self._drain_monitor()
            if self._zap is not None and self._zap in ready:
                self._answer(self._zap, self._zap.recv_multipart())

    def _drain_monitor(self) -> None:
        monitor = self._monitor
        assert monitor is not None           # registered with the poller only when there is one
        while monitor.poll(0):
            frames = monitor.recv_multipart()
            event, value = _EVENT.unpack(frames[0][:_EVENT.size])
            if event == zmq.EVENT_ACCEPTED:
                if len(self._open) >= self.max_connections:
                    self._drop(value)
                else:
                    self._open.add(value)
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._open.discard(value)
            else:
                self.counters["handshakes_failed"] += 1
                self._report("handshake", "a peer failed its handshake (no key, a wrong server key, or not "
                                          "ZeroMQ) and was dropped unread")

    def _report(self, kind: str, text: str) -> None:
        """Warn about a refusal of ``kind`` now if none was warned about lately, else count it for later."""
        count, last = self._reports.get(kind, (0, -float("inf")))
        now = time.monotonic()
        if now - last < REPORT_SECONDS:
            self._reports[kind] = (count + 1, last)
            return
        self._reports[kind] = (0, now)
        self._warn(f"{self.where}: {text}" + (f" (and {count} more since the last warning)" if count else ""))

    def _drop(self, fd: int) -> None:
        """Shut down a connection beyond the limit before its handshake (ZeroMQ then closes it)."""
        try:
            with pysocket.socket(fileno=os.dup(fd)) as extra:
                peer = extra.getpeername()
                extra.shutdown(pysocket.SHUT_RDWR)
        except OSError:
            return  # already gone
        self.counters["connections_dropped"] += 1
        self._report("dropped", f"dropped a connection from {peer[0]}:{peer[1]}: already "
                                f"{self.max_connections} connections (max-connections)")

    def _answer(self, zap: zmq.Socket, request: list[bytes]) -> None:
        if len(request) < 6:
            return  # not a ZAP request; ZeroMQ itself never sends one
        version, request_id, _domain, address, _identity, mechanism, *credentials = request
        key = zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials else None
        if key is not None and self.allowed is not None and key in self.allowed:
            status, text, user = b"200", b"OK", key
            self.counters["peers_admitted"] += 1
        else:
            reason = "unknown key" if key is not None else f"no key (mechanism {mechanism.decode(errors='replace')})"
            status, text, user = b"400", b"not authorized", b""
            self.counters["peers_refused"] += 1
            self._report(f"refused {key!r}", f"refused a peer at {address.decode(errors='replace')}: {reason}"
                                             + (f" {key.decode()}" if key is not None else ""))
        zap.send_multipart([version, request_id, status, text, user, b""])

    def close(self) -> None:
        """Stop the thread (call from the thread that owns the guarded socket, before closing it)."""
        self._stop_sender.send(b"")
        self._thread.join()
        if self._monitor is not None:
            self._guarded.disable_monitor()
        for sock in (self._zap, self._monitor, self._stop_receiver, self._stop_sender):
            if sock is not None:
                sock.close(linger=0)
