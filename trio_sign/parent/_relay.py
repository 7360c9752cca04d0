"""The parent's SSE relay: the enclave's only way out to the Sign Gateway (DESIGN §1, §3, §5).

The enclave connects (vsock; a UNIX socket locally) and sends one HTTP/1.1 ``GET``. The relay
maps it to an upstream URL, ``https://{Host}{path}``, and forwards it only if that URL matches an
allowlist entry exactly on scheme, host and port and on a segment-aware path prefix. It opens TLS
to the upstream with certificate verification and SNI, forwards only a few harmless request
headers (never the enclave's own credentials), never follows redirects, and streams the response
back with back-pressure: each piece read from the upstream is written to the enclave before the
next read, so at most one receive buffer is held per connection.

Credentials: the gateway authenticates each node's subscription with a bearer token (DESIGN
§16). The parent holds it (``[relay] token`` or ``token_file`` in ``parent.toml``), and the
relay adds ``Authorization: Bearer <token>`` to every request it forwards (so only to
allowlisted URLs: list nothing but your gateway). The enclave never sees the token; any
``Authorization``, ``Cookie`` or ``Proxy-*`` header it sends is dropped, as before. Without a
token the relay forwards no ``Authorization`` at all (and the gateway answers ``401``).

Layers: :class:`Allowlist` and :func:`parse_relay_request` are sans-io (no ``await``); the Trio
code in :func:`serve_sse_relay` only moves bytes. The upstream response is parsed with the SSE
client's strict :class:`~trio_sign.sse.ResponseParser` and re-framed as chunked towards the
enclave.

Scheme: an origin-form request (``GET /path``; what :func:`trio_sign.sse.run_sse_client` sends)
means ``https``, except that when no ``https`` entry matches but an entry that explicitly says
``http://`` matches the same host, port and path, that entry's plain ``http`` is used (local
development only; the relay warns about such entries at start). An absolute-form request
(``GET http://host:port/path``) names its scheme, which must match an entry's exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import ssl
import string
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import trio

from .._errors import TrioSignError
from ..sse import BodyData, ResponseHead, ResponseParser, SseProtocolError

log = logging.getLogger("trio_sign.parent.relay")

#: Largest request head (request line and headers) the enclave may send, in bytes.
DEFAULT_MAX_REQUEST_HEAD_BYTES: Final = 8 * 1024
#: Most header lines in the enclave's request.
DEFAULT_MAX_REQUEST_HEADERS: Final = 32
#: Largest upstream response head, in bytes.
DEFAULT_MAX_RESPONSE_HEAD_BYTES: Final = 16 * 1024
#: Bytes read from the upstream per receive: the relay's whole per-connection body buffer.
DEFAULT_RECEIVE_BYTES: Final = 16 * 1024
#: TCP connect plus TLS handshake to the upstream must finish within this.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
#: The enclave must send its request head within this.
DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
#: No upstream bytes (SSE comments count), or no progress writing to the enclave, for this long
#: closes both sides. Longer than the gateway's keepalive interval.
DEFAULT_IDLE_TIMEOUT_S: Final = 90.0
#: Concurrent relayed connections; more are answered ``503``.
DEFAULT_MAX_CONNECTIONS: Final = 16
#: A bearer token the relay may send (RFC 6750 ``b64token``), long enough to be a secret.
UPSTREAM_TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9._~+/-]{16,1024}=*")
UPSTREAM_TOKEN_RULE: Final = "16 to 1024 characters of A-Z a-z 0-9 - . _ ~ + / (then optional =)"

#: Request headers forwarded upstream (lower case). Everything else is dropped.
FORWARDED_REQUEST_HEADERS: Final = frozenset(
    {"accept", "last-event-id", "cache-control", "user-agent"}
)
#: Response headers passed back to the enclave (lower case).
FORWARDED_RESPONSE_HEADERS: Final = frozenset({"content-type", "cache-control", "retry-after"})
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "cookie"})

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_REQUEST_LINE: Final = re.compile(rb"([A-Z]+) ([!-~]+) HTTP/1\.([01])")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e]*")
_AUTHORITY: Final = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_HEXDIGITS: Final = frozenset(string.hexdigits)
_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_PCHAR: Final = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_QUERY_CHARS: Final = _PCHAR | frozenset("/?")


class RelayConfigError(TrioSignError):
    """An allowlist entry or a relay setting was refused."""


class RelayRefused(TrioSignError):
    """The relay refused a request (internal to a connection; answered with ``status``).

    Attributes:
        status: the HTTP status sent to the enclave.
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def valid_upstream_token(token: str) -> bool:
    """Whether ``token`` can be sent as ``Authorization: Bearer`` (:data:`UPSTREAM_TOKEN_RULE`)."""
    return isinstance(token, str) and UPSTREAM_TOKEN_PATTERN.fullmatch(token) is not None


# -- allowlist (sans-io) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllowedUrl:
    """One allowlist entry: scheme, host and port match exactly, the path by segment prefix.

    Attributes:
        scheme: ``"https"`` (or ``"http"``, only when the entry says so, for local development).
        host: lower-case host name or IP literal (IPv6 without brackets).
        port: explicit, or the scheme's default.
        path_prefix: a normalised path. Ending in ``/`` it matches any path below; otherwise it
            matches itself and anything below ``path_prefix + "/"``.
    """

    scheme: str
    host: str
    port: int
    path_prefix: str

    @classmethod
    def parse(cls, text: str) -> AllowedUrl:
        """Parse an entry like ``https://gateway.internal:8443/v1/enclaves/``.

        Raises:
            RelayConfigError: not an http(s) URL, credentials, a query or fragment, no host, or
                a path that is not already normal (dot segments, encoded slashes).
        """
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise RelayConfigError(f"relay allowlist entry {text!r} is not a URL: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise RelayConfigError(
                f"relay allowlist entry {text!r}: scheme must be https:// (or http:// for local"
                " development)"
            )
        if "@" in parts.netloc or parts.query or parts.fragment or not parts.hostname:
            raise RelayConfigError(
                f"relay allowlist entry {text!r}: expected scheme://host[:port]/path-prefix with"
                " no credentials, query or fragment"
            )
        try:
            path = normalise_path(parts.path or "/")
        except RelayRefused as exc:
            raise RelayConfigError(f"relay allowlist entry {text!r}: {exc}") from None
        return cls(
            scheme=scheme,
            host=parts.hostname.lower(),
            port=port if port is not None else _DEFAULT_PORTS[scheme],
            path_prefix=path,
        )

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        """Whether the (already normalised) request URL falls under this entry."""
        if (scheme, host, port) != (self.scheme, self.host, self.port):
            return False
        prefix = self.path_prefix
        if prefix.endswith("/"):
            return path.startswith(prefix)
        return path == prefix or path.startswith(prefix + "/")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path_prefix}"


class Allowlist:
    """The URLs the enclave may reach. Empty means nothing is forwarded."""

    def __init__(self, entries: Iterable[str | AllowedUrl]) -> None:
        self.entries: tuple[AllowedUrl, ...] = tuple(
            e if isinstance(e, AllowedUrl) else AllowedUrl.parse(e) for e in entries
        )

    def match(self, scheme: str, host: str, port: int, path: str) -> AllowedUrl | None:
        """The first entry the request URL falls under, or None."""
        for entry in self.entries:
            if entry.matches(scheme, host, port, path):
                return entry
        return None

    def allows(self, url: str) -> bool:
        """Whether an absolute ``http(s)://`` URL falls under an entry, its path normalised as
        a request's would be.

        Raises:
            RelayRefused: a path the relay refuses outright (dot segments, encoded slashes).
            ValueError: not a URL.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return False
        port = parts.port or _DEFAULT_PORTS[scheme]
        path = normalise_path(parts.path or "/")
        return self.match(scheme, parts.hostname.lower(), port, path) is not None

    def resolve(self, request: RelayRequest) -> RelayRequest | None:
        """The request as it will be forwarded (scheme and port settled), or None if refused.

        An origin-form request is ``https``; if nothing matches that, an explicit ``http://``
        entry for the same host, port (80 when the ``Host`` has none) and path is used.
        """
        if self.match(request.scheme, request.host, request.port, request.path) is not None:
            return request
        if not request.origin_form:
            return None
        port = request.port if request.explicit_port else _DEFAULT_PORTS["http"]
        if self.match("http", request.host, port, request.path) is None:
            return None
        return dataclasses.replace(request, scheme="http", port=port)


def normalise_path(path: str) -> str:
    """Normalise a request path (RFC 3986 §6.2.2) and refuse the tricky ones.

    Percent-encoded unreserved characters are decoded, other percent-encodings upper-cased.

    Raises:
        RelayRefused: ``403`` for dot segments (``.``/``..``, encoded or not), encoded ``/`` or
            ``\\``, a backslash or an empty segment; ``400`` for characters a path may not hold
            or a broken percent-encoding.
    """
    if not path.startswith("/"):
        raise RelayRefused("the path must start with '/'", status=400)
    out: list[str] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEXDIGITS:
                raise RelayRefused("broken percent-encoding in the path", status=400)
            decoded = chr(int(pair, 16))
            if decoded in "/\\":
                raise RelayRefused("encoded slash or backslash in the path", status=403)
            if decoded < " " or decoded == "\x7f":
                raise RelayRefused("encoded control character in the path", status=400)
            out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
            i += 3
            continue
        if char == "\\":
            raise RelayRefused("backslash in the path", status=403)
        if char != "/" and char not in _PCHAR:
            raise RelayRefused(f"character {char!r} is not allowed in the path", status=400)
        out.append(char)
        i += 1
    normal = "".join(out)
    segments = normal.split("/")[1:]
    if any(segment in (".", "..") for segment in segments):
        raise RelayRefused("dot segment in the path", status=403)
    if "" in segments[:-1]:
        raise RelayRefused("empty segment ('//') in the path", status=403)
    return normal


# -- the enclave's request (sans-io) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayRequest:
    """The enclave's request, parsed and normalised, before the allowlist check.

    Attributes:
        headers: the forwardable headers only (lower-case name, value), in wire order.
        dropped: names of headers that were dropped because they carry credentials.
        origin_form: the request target was a path (the scheme is assumed, not given).
        explicit_port: the port was written out (not the scheme's default).
    """

    scheme: str
    host: str
    port: int
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    origin_form: bool = True
    explicit_port: bool = True

    @property
    def authority(self) -> str:
        """``host[:port]`` for the upstream ``Host`` header (the port only when not default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"

    def upstream_request(self, *, token: str | None = None) -> bytes:
        """The bytes sent upstream: ``GET``, ``Host``, the forwarded headers, then
        ``Authorization: Bearer <token>`` when the parent has a ``token``, ``close``."""
        lines = [f"GET {self.target} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{_canonical(name)}: {value}" for name, value in self.headers]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _canonical(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-")).replace("-Id", "-ID")


def _parse_authority(text: str, scheme: str) -> tuple[str, int, bool]:
    match = _AUTHORITY.fullmatch(text)
    if match is None:
        raise RelayRefused(f"malformed host {text[:80]!r}", status=400)
    host = match.group("host").lower().strip("[]")
    port_text = match.group("port")
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise RelayRefused(f"port {port} out of range", status=400)
    return host, port, bool(port_text)


def parse_relay_request(
    head: bytes, *, max_headers: int = DEFAULT_MAX_REQUEST_HEADERS
) -> RelayRequest:
    """Parse the enclave's request head (without the final empty line).

    Raises:
        RelayRefused: ``400`` malformed, ``405`` not ``GET``, ``403`` a scheme other than http(s)
            or a refused path (see :func:`normalise_path`).
    """
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise RelayRefused("malformed request line", status=400)
    if match.group(3) != b"1":
        raise RelayRefused("HTTP/1.1 is required (the response is chunked)", status=400)
    if match.group(1) != b"GET":
        raise RelayRefused(f"method {match.group(1).decode('ascii')} is not relayed", status=405)
    if len(lines) - 1 > max_headers:
        raise RelayRefused(f"more than {max_headers} request headers", status=400)
    headers: list[tuple[str, str]] = []
    dropped: list[str] = []
    host_values: list[str] = []
    for line in lines[1:]:
        raw_name, sep, raw_value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(raw_name):
            raise RelayRefused("malformed header line", status=400)
        raw_value = raw_value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(raw_value):
            raise RelayRefused("control or non-ASCII character in a header", status=400)
        name = raw_name.decode("ascii").lower()
        value = raw_value.decode("ascii")
        if name == "host":
            host_values.append(value)
        elif name in ("content-length", "transfer-encoding"):
            if name == "transfer-encoding" or value != "0":
                raise RelayRefused("a request body is not relayed", status=400)
        elif name in FORWARDED_REQUEST_HEADERS:
            if any(n == name for n, _ in headers):
                raise RelayRefused(f"duplicate {name} header", status=400)
            headers.append((name, value))
        elif name in _CREDENTIAL_HEADERS or name.startswith("proxy-"):
            dropped.append(name)
    if len(host_values) != 1:
        raise RelayRefused("exactly one Host header is required", status=400)
    target = match.group(2).decode("ascii")
    origin_form = target.startswith("/")
    if origin_form:
        scheme = "https"
        authority = host_values[0]
    else:
        scheme, found, rest = target.partition("://")
        scheme = scheme.lower()
        if not found:
            raise RelayRefused("malformed request target", status=400)
        if scheme not in _DEFAULT_PORTS:
            raise RelayRefused(f"scheme {scheme[:16]!r} is not relayed", status=403)
        authority, slash, path_rest = rest.partition("/")
        if "@" in authority:
            raise RelayRefused("credentials in the request target", status=403)
        target = slash + path_rest if slash else "/"
        if _parse_authority(authority, scheme)[:2] != _parse_authority(host_values[0], scheme)[:2]:
            raise RelayRefused("the Host header does not match the request target", status=400)
    host, port, explicit_port = _parse_authority(authority, scheme)
    raw_path, _, query = target.partition("?")
    if "#" in target:
        raise RelayRefused("a fragment in the request target", status=400)
    path = normalise_path(raw_path)
    if not _valid_query(query):
        raise RelayRefused("character not allowed in the query", status=400)
    return RelayRequest(
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        query=query,
        headers=tuple(headers),
        dropped=tuple(dropped),
        origin_form=origin_form,
        explicit_port=explicit_port,
    )


def _valid_query(query: str) -> bool:
    i = 0
    while i < len(query):
        if query[i] == "%":
            if not set(query[i + 1 : i + 3]) <= _HEXDIGITS or len(query[i + 1 : i + 3]) != 2:
                return False
            i += 3
        elif query[i] in _QUERY_CHARS:
            i += 1
        else:
            return False
    return True


_REASONS: Final = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_response(status: int, message: str) -> bytes:
    """A small ``text/plain`` response that closes the connection."""
    body = (message + "\n").encode("utf-8", "replace")
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


def _response_head(head: ResponseHead, *, has_body: bool) -> bytes:
    reason = head.reason.encode("latin-1", "replace").decode("latin-1")
    lines = [f"HTTP/1.1 {head.status} {reason}"]
    lines += [
        f"{_canonical(name)}: {value}"
        for name, value in head.headers
        if name in FORWARDED_RESPONSE_HEADERS
    ]
    lines.append("Transfer-Encoding: chunked" if has_body else "Content-Length: 0")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- the Trio service --------------------------------------------------------------------------


@dataclass(slots=True)
class RelayStats:
    """Counters for health and metrics; updated in place by the relay.

    Attributes:
        active: connections being handled now.
        accepted: connections accepted in total.
        forwarded: requests forwarded upstream (a response head may or may not have come back).
        refused: requests refused by policy or as malformed (4xx to the enclave).
        upstream_failures: upstream connect/TLS/protocol failures, timeouts and redirects.
        redirects: upstream 3xx responses refused.
        bytes_relayed: body bytes written to the enclave.
    """

    active: int = 0
    accepted: int = 0
    forwarded: int = 0
    refused: int = 0
    upstream_failures: int = 0
    redirects: int = 0
    bytes_relayed: int = 0


ConnectUpstream = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class _UpstreamFailed(Exception):
    def __init__(self, message: str, *, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


_IO_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _Relay:
    def __init__(
        self,
        allowlist: Allowlist,
        *,
        ssl_context: ssl.SSLContext,
        connect_upstream: ConnectUpstream,
        stats: RelayStats,
        max_request_head_bytes: int,
        max_response_head_bytes: int,
        receive_bytes: int,
        connect_timeout_s: float,
        request_timeout_s: float,
        idle_timeout_s: float,
        max_connections: int,
        upstream_token: str | None,
    ) -> None:
        self.allowlist = allowlist
        self._upstream_token = upstream_token  # never logged
        self.ssl_context = ssl_context
        self.connect_upstream = connect_upstream
        self.stats = stats
        self.max_request_head_bytes = max_request_head_bytes
        self.max_response_head_bytes = max_response_head_bytes
        self.receive_bytes = receive_bytes
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.limiter = trio.CapacityLimiter(max_connections)

    async def handle(self, enclave: trio.abc.Stream) -> None:
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            try:
                self.limiter.acquire_nowait()
            except trio.WouldBlock:
                log.warning(
                    "sse relay: %d connections already open (max_connections); refusing",
                    self.limiter.total_tokens,
                )
                self.stats.refused += 1
                await self._send_error(enclave, 503, "too many relay connections")
                return
            try:
                await self._handle(enclave)
            finally:
                self.limiter.release()
        finally:
            self.stats.active -= 1
            await trio.aclose_forcefully(enclave)

    async def _handle(self, enclave: trio.abc.Stream) -> None:
        try:
            head = await self._read_head(enclave)
            if head is None:
                return
            parsed = parse_relay_request(head)
            resolved = self.allowlist.resolve(parsed)
            if resolved is None:
                raise RelayRefused(f"{parsed.url()} is not on the relay allowlist", status=403)
            request = resolved
        except RelayRefused as exc:
            self.stats.refused += 1
            log.warning("sse relay: refused the enclave's request (%d): %s", exc.status, exc)
            await self._send_error(enclave, exc.status, str(exc))
            return
        if request.dropped:
            log.warning(
                "sse relay: dropped credential headers from the enclave's request: %s",
                ", ".join(sorted(set(request.dropped))),
            )
        upstream: trio.abc.Stream | None = None
        try:
            upstream = await self._open_upstream(request)
            self.stats.forwarded += 1
            log.info("sse relay: forwarding to %s", request.url())
            await self._relay(request, enclave, upstream)
        except _UpstreamFailed as exc:
            self.stats.upstream_failures += 1
            log.warning("sse relay: upstream %s failed: %s", request.url(), exc)
            await self._send_error(enclave, exc.status, f"upstream failed: {exc}")
        finally:
            if upstream is not None:
                await trio.aclose_forcefully(upstream)

    async def _read_head(self, enclave: trio.abc.Stream) -> bytes | None:
        buffer = bytearray()
        limit = self.max_request_head_bytes
        with trio.move_on_after(self.request_timeout_s) as scope:
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end != -1:
                    break
                if len(buffer) > limit:
                    raise RelayRefused(
                        f"request head larger than {limit} bytes (max_request_head_bytes)",
                        status=431,
                    )
                try:
                    data = await enclave.receive_some(limit + 4 - len(buffer) + 1)
                except _IO_ERRORS:
                    return None
                if not data:
                    if buffer:
                        log.warning("sse relay: the enclave closed mid-request")
                    return None
                buffer += data
        if scope.cancelled_caught:
            raise RelayRefused(
                f"no complete request within {self.request_timeout_s} s (request_timeout_s)",
                status=408,
            )
        if end > limit:
            raise RelayRefused(
                f"request head larger than {limit} bytes (max_request_head_bytes)", status=431
            )
        if len(buffer) > end + 4:
            raise RelayRefused("bytes after the request head (no body, no pipelining)", status=400)
        return bytes(buffer[:end])

    async def _open_upstream(self, request: RelayRequest) -> trio.abc.Stream:
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(self.connect_timeout_s) as scope:
            try:
                stream = await self.connect_upstream(request.host, request.port)
                if request.scheme == "https":
                    tls = trio.SSLStream(
                        stream,
                        self.ssl_context,
                        server_hostname=request.host,
                        https_compatible=True,
                    )
                    stream = tls
                    await tls.do_handshake()
                await stream.send_all(request.upstream_request(token=self._upstream_token))
            except (*_IO_ERRORS, ssl.SSLError) as exc:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                raise _UpstreamFailed(_describe(exc)) from exc
            return stream
        assert scope.cancelled_caught
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise _UpstreamFailed(
            f"connect and TLS handshake took longer than {self.connect_timeout_s} s"
            " (connect_timeout_s)",
            status=504,
        )

    async def _relay(
        self, request: RelayRequest, enclave: trio.abc.Stream, upstream: trio.abc.Stream
    ) -> None:
        failure: _UpstreamFailed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_enclave, enclave, nursery.cancel_scope)
            try:
                failure = await self._pump(request, upstream, enclave)
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _watch_enclave(self, enclave: trio.abc.Stream, scope: trio.CancelScope) -> None:
        """The enclave sends nothing after its request: any read result means it is done."""
        try:
            data = await enclave.receive_some(1)
        except _IO_ERRORS:
            data = b""
        log.info(
            "sse relay: the enclave %s; closing the upstream",
            "sent unexpected bytes" if data else "closed its side",
        )
        scope.cancel()

    async def _pump(
        self, request: RelayRequest, upstream: trio.abc.Stream, enclave: trio.abc.Stream
    ) -> _UpstreamFailed | None:
        """Move the response; return (not raise: we are in a nursery) a failure that
        happened before the response head went to the enclave."""
        parser = ResponseParser(max_head_size=self.max_response_head_bytes)
        head_sent = False
        chunked = False
        idle = self.idle_timeout_s
        while True:
            with trio.move_on_after(idle) as scope:
                try:
                    data = await upstream.receive_some(self.receive_bytes)
                except (*_IO_ERRORS, ssl.SSLError) as exc:
                    return self._upstream_broke(head_sent, _describe(exc))
            if scope.cancelled_caught:
                return self._upstream_broke(
                    head_sent, f"no bytes for {idle} s (idle_timeout_s)", status=504
                )
            try:
                items = parser.receive_data(data) if data else parser.receive_eof()
            except SseProtocolError as exc:
                return self._upstream_broke(head_sent, str(exc))
            for item in items:
                if isinstance(item, ResponseHead):
                    if 300 <= item.status < 400:
                        self.stats.redirects += 1
                        return _UpstreamFailed(
                            f"upstream answered {item.status} (redirects are not followed)"
                        )
                    chunked = item.status not in (204, 304)
                    if not await self._send(enclave, _response_head(item, has_body=chunked)):
                        return None
                    head_sent = True
                    if not chunked:
                        return None
                elif isinstance(item, BodyData):
                    if item.data and chunked:
                        frame = b"%x\r\n%s\r\n" % (len(item.data), item.data)
                        if not await self._send(enclave, frame):
                            return None
                        self.stats.bytes_relayed += len(item.data)
                else:
                    await self._send(enclave, b"0\r\n\r\n")
                    log.info("sse relay: upstream %s ended the response", request.url())
                    return None
            if not data:
                return None

    def _upstream_broke(
        self, head_sent: bool, reason: str, *, status: int = 502
    ) -> _UpstreamFailed | None:
        if not head_sent:
            return _UpstreamFailed(reason, status=status)
        # Mid-body: closing without the last chunk tells the enclave the stream broke.
        self.stats.upstream_failures += 1
        log.warning("sse relay: upstream stream broke: %s", reason)
        return None

    async def _send(self, enclave: trio.abc.Stream, data: bytes) -> bool:
        """Write to the enclave (back-pressure: the upstream is not read meanwhile)."""
        with trio.move_on_after(self.idle_timeout_s) as scope:
            try:
                await enclave.send_all(data)
            except _IO_ERRORS:
                return False
        if scope.cancelled_caught:
            log.warning(
                "sse relay: the enclave read nothing for %s s (idle_timeout_s); closing",
                self.idle_timeout_s,
            )
            return False
        return True

    async def _send_error(self, enclave: trio.abc.Stream, status: int, message: str) -> None:
        with trio.move_on_after(self.request_timeout_s):
            with contextlib.suppress(*_IO_ERRORS):
                await enclave.send_all(error_response(status, message))
                if isinstance(enclave, trio.abc.HalfCloseableStream):
                    await enclave.send_eof()
                # Lingering close: read what the enclave still sends (bounded), so that closing
                # with unread bytes does not reset the connection before it reads the answer.
                drained = 0
                while drained <= 4 * self.max_request_head_bytes:
                    data = await enclave.receive_some(self.max_request_head_bytes)
                    if not data:
                        break
                    drained += len(data)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc) or type(exc).__name__


async def serve_sse_relay(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    allowlist: Allowlist | Iterable[str],
    *,
    ssl_context_for_upstream: ssl.SSLContext,
    connect_upstream: ConnectUpstream | None = None,
    stats: RelayStats | None = None,
    max_request_head_bytes: int = DEFAULT_MAX_REQUEST_HEAD_BYTES,
    max_response_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    receive_bytes: int = DEFAULT_RECEIVE_BYTES,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    upstream_token: str | None = None,
    task_status: trio.TaskStatus[RelayStats] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the enclave's SSE connections on ``listeners`` until cancelled.

    Args:
        listeners: where the enclave connects (vsock in production, UNIX locally).
        allowlist: entries such as ``"https://gateway.internal:8443/v1/enclaves/"``.
        ssl_context_for_upstream: must verify certificates and host names
            (``ssl.create_default_context()``, or one with a private CA loaded).
        connect_upstream: ``(host, port) -> Stream``, the raw TCP connection (default
            :func:`trio.open_tcp_stream`); tests point it at loopback. TLS is layered on top.
        stats: counters to update (a fresh :class:`RelayStats` if None).
        upstream_token: this node's bearer token at the gateway, sent as ``Authorization:
            Bearer`` with every forwarded request (never logged, never shown to the enclave);
            None sends no ``Authorization``.

    Readiness: ``task_status.started(stats)`` once the accept loops run.

    Each connection: the request head within ``request_timeout_s`` and at most
    ``max_request_head_bytes``; the upstream connect and TLS handshake within
    ``connect_timeout_s``; then no more than ``idle_timeout_s`` without upstream bytes or
    without progress writing to the enclave. Refusals get a ``4xx`` and a WARNING log; upstream
    failures (including any ``3xx``) a ``502`` (``504`` for timeouts) before the response head,
    or a closed connection after it.

    Cancellation: closes every connection, both sides.

    Error handling: a bad allowlist entry or ``upstream_token`` raises
    :class:`RelayConfigError`, an unverifying ``ssl_context_for_upstream`` ``ValueError``, all
    before ``started``. Nothing that a peer does
    raises out of the relay.
    """
    if ssl_context_for_upstream.verify_mode != ssl.CERT_REQUIRED or not (
        ssl_context_for_upstream.check_hostname
    ):
        raise ValueError("ssl_context_for_upstream must verify certificates and host names")
    if min(max_request_head_bytes, max_response_head_bytes, receive_bytes, max_connections) < 1:
        raise ValueError("relay sizes and max_connections must be positive")
    if min(connect_timeout_s, request_timeout_s, idle_timeout_s) <= 0:
        raise ValueError("relay timeouts must be positive")
    if upstream_token is not None and not valid_upstream_token(upstream_token):
        raise RelayConfigError(f"the relay's upstream token must be {UPSTREAM_TOKEN_RULE}")
    allow = allowlist if isinstance(allowlist, Allowlist) else Allowlist(allowlist)
    if not allow.entries:
        log.warning("sse relay: the allowlist is empty; every request will be refused")
    for entry in allow.entries:
        if entry.scheme == "http":
            log.warning("sse relay: allowlist entry %s is plain http (development only)", entry)
    relay = _Relay(
        allow,
        ssl_context=ssl_context_for_upstream,
        connect_upstream=connect_upstream if connect_upstream is not None else _open_tcp,
        stats=stats if stats is not None else RelayStats(),
        max_request_head_bytes=max_request_head_bytes,
        max_response_head_bytes=max_response_head_bytes,
        receive_bytes=receive_bytes,
        connect_timeout_s=connect_timeout_s,
        request_timeout_s=request_timeout_s,
        idle_timeout_s=idle_timeout_s,
        max_connections=max_connections,
        upstream_token=upstream_token,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, relay.handle, list(listeners))
        task_status.started(relay.stats)
