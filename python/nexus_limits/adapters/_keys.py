"""Who the client is: the key sources of ``key=`` and the client address behind
trusted proxies.

A key source the client controls is read so that the limiter and the app cannot see
two different clients in one request: a header or query parameter given twice with
different values is refused (:class:`~nexus_limits.errors.BadRequest`), never joined
into a fresh key. Servers join a repeated header into one value with commas (WSGI
servers, Django, and the ASGI adapter's ``Request.headers``), so a comma in a key
header counts as a repeat.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any, Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl

from ..errors import BadRequest

__all__ = ["FORWARDED_HEADERS", "KeyFunc", "Request", "client_ip", "parse_key_spec"]


class Request(NamedTuple):
    """The parts of a request the adapters look at.

    ``method`` upper-case and ``path`` normalised (see
    :func:`~nexus_limits.adapters.normalize_target`) when built by a middleware;
    ``headers`` with lower-case names, a repeated header joined into one value with
    commas; ``query`` the raw query string; ``peer`` the address of the connection.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    query: str
    peer: Optional[str]


KeyFunc = Callable[[Request], Optional[Union[str, bytes, int]]]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The headers a proxy may write the client address into (``forwarded_header=``).
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")

_KEY_FORMS = "a callable or one of 'ip', 'bearer', 'header:<name>', 'query:<name>' (or a list of these)"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_LONGEST_ADDRESS = 64  # "[v6%zone]:port" and quotes; anything longer is no address


def _networks(trusted: Iterable[str]) -> Tuple[_Network, ...]:
    if isinstance(trusted, (str, bytes)):
        raise TypeError(f"trusted_proxies must be a list of addresses or networks, not one string: [{trusted!r}]")
    nets: List[_Network] = []
    for item in trusted:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except (ValueError, TypeError):
            raise ValueError(f"trusted_proxies: {item!r} is not an IP address or network") from None
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
            # Peers are compared as IPv4 when they arrive IPv4-mapped; so are these.
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        nets.append(net)
    return tuple(nets)


def _check_forwarded_header(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in FORWARDED_HEADERS:
        raise ValueError(
            f"forwarded_header must be one of {', '.join(repr(h) for h in FORWARDED_HEADERS)} "
            f"(the header your proxy writes), got {name!r}"
        )
    return name.lower()


def _check_ipv6_prefix(prefix: Any) -> int:
    if isinstance(prefix, bool) or not isinstance(prefix, int):
        raise TypeError(f"ipv6_prefix must be an int from 1 to 128, got {type(prefix).__name__}")
    if not 1 <= prefix <= 128:
        raise ValueError(f"ipv6_prefix must be from 1 to 128 (64: one /64 is one client), got {prefix}")
    return prefix


@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> Optional[IPAddress]:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    if text.startswith("["):  # "[v6]" or "[v6]:port"
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "-"
        if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text, _, port = text.partition(":")
        if not (port.isascii() and port.isdigit()):
            return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_ip(text: Optional[str]) -> Optional[IPAddress]:
    """An address as a peer or a forwarding header gives it (``1.2.3.4``,
    ``1.2.3.4:80``, ``[2001:db8::1]:443``, quoted), IPv4-mapped IPv6 as IPv4; None
    when it is no address (``unknown``, an obfuscated ``_node``, garbage)."""
    if not text or len(text) > _LONGEST_ADDRESS:
        return None
    return _parse_ip(text)


def _is_trusted(ip: IPAddress, trusted: Sequence[_Network]) -> bool:
    return any(ip in net for net in trusted)


# One `name=value` pair of a Forwarded element (RFC 7239): value a token or a
# quoted-string.
_PAIR = re.compile(r'[ \t]*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;,\s"]*)[ \t]*')
_QUOTED_PAIR = re.compile(r"\\(.)")


def _forwarded_hops(value: str) -> List[Optional[IPAddress]]:
    """The ``for=`` of each element, left to right; None for an element without one,
    or with one that is no address. A value that does not parse is one None hop."""
    hops: List[Optional[IPAddress]] = []
    found: Optional[str] = None
    pairs = 0
    pos, n = 0, len(value)
    while True:
        while pos < n and value[pos] in " \t":
            pos += 1
        if pos >= n or value[pos] == ",":
            if pairs:
                hops.append(parse_ip(found))
            if pos >= n:
                return hops
            found, pairs, pos = None, 0, pos + 1
            continue
        if value[pos] == ";" and pairs:
            pos += 1
            continue
        m = _PAIR.match(value, pos)
        if m is None:
            return [*hops, None]
        name, text = m.group(1).lower(), m.group(2)
        if text.startswith('"'):
            text = _QUOTED_PAIR.sub(r"\1", text[1:-1])
        if name == "for":
            if found is not None:
                return [*hops, None]  # two for= in one element: not from a proxy we know
            found = text
        pairs += 1
        pos = m.end()


def client_address(
    request: Request, trusted: Sequence[_Network], header: str = "x-forwarded-for"
) -> Optional[IPAddress]:
    """The client's address: the peer, unless the peer is a trusted proxy; then, in the
    one ``header`` that proxy writes, the right-most address that is not itself a
    trusted proxy. An entry that is no address stops the walk at the peer (nothing
    left of it can be vouched for); when every entry is trusted, the left-most."""
    peer = parse_ip(request.peer)
    if peer is None or not trusted or not _is_trusted(peer, trusted):
        return peer
    value = request.headers.get(header)
    if not value:
        return peer
    hops: Iterable[Optional[IPAddress]]
    if header == "forwarded":
        hops = reversed(_forwarded_hops(value))
    else:  # a comma-separated list (X-Real-IP too, when repeated)
        hops = (parse_ip(item) for item in reversed(value.split(",")) if item.strip())
    last: Optional[IPAddress] = None
    for hop in hops:
        if hop is None:
            return peer
        if not _is_trusted(hop, trusted):
            return hop
        last = hop
    return last if last is not None else peer


def client_ip(
    request: Request, trusted: Sequence[_Network], forwarded_header: str = "x-forwarded-for"
) -> Optional[str]:
    """:func:`client_address` as a string (``None`` when the peer is unknown)."""
    ip = client_address(request, trusted, forwarded_header)
    return None if ip is None else str(ip)


@lru_cache(maxsize=4096)
def _address_key(ip: IPAddress, prefix: int) -> str:
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if prefix == 128:
        return str(ipaddress.IPv6Address(int(ip)))  # without a %zone
    bits = 128 - prefix
    return str(ipaddress.IPv6Network(((int(ip) >> bits) << bits, prefix)))


@lru_cache(maxsize=4096)
def _peer_key(peer: str, prefix: int) -> Optional[str]:
    ip = parse_ip(peer)
    return None if ip is None else _address_key(ip, prefix)


def _ip_source(trusted: Tuple[_Network, ...], header: str, prefix: int) -> Callable[[Request], Optional[str]]:
    if not trusted:

        def peer_key(r: Request) -> Optional[str]:
            return _peer_key(r.peer, prefix) if r.peer else None

        return peer_key

    def forwarded_key(r: Request) -> Optional[str]:
        ip = client_address(r, trusted, header)
        return None if ip is None else _address_key(ip, prefix)

    return forwarded_key


def _bearer(r: Request) -> Optional[str]:
    auth = r.headers.get("authorization")
    if not auth:
        return None
    if "," in auth:  # several Authorization headers, or a scheme with parameters
        items = [item.strip() for item in auth.split(",")]
        if not any(item[:6].lower() == "bearer" for item in items):
            return None
        if any(item != items[0] for item in items):
            raise BadRequest("the Authorization header is repeated with different values")
        auth = items[0]
    parts = auth.split()
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return None
    if len(parts) > 2:
        raise BadRequest("the Authorization header holds more than one credential (a bearer token has no spaces)")
    return parts[1]


def _header_source(name: str) -> KeyFunc:
    def header_key(r: Request) -> Optional[str]:
        value = r.headers.get(name)
        if value is None:
            return None
        if "," in value:
            items = [item.strip() for item in value.split(",")]
            if any(item != items[0] for item in items):
                raise BadRequest(f"the {name} header is repeated with different values (or holds a comma)")
            return items[0] or None
        return value.strip() or None

    return header_key


def _query_source(name: str) -> KeyFunc:
    def query_key(r: Request) -> Optional[str]:
        query = r.query
        if not query or (name not in query and "%" not in query and "+" not in query):
            return None
        try:
            pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
        except ValueError:  # UnicodeDecodeError
            raise BadRequest("the query string is not UTF-8 once decoded") from None
        values = [v for k, v in pairs if k == name]
        if not values:
            return None
        if any(v != values[0] for v in values):
            raise BadRequest(f"the query parameter {name!r} is repeated with different values")
        return values[0] or None

    return query_key


def _source(key: Any, trusted: Tuple[_Network, ...], header: str, prefix: int) -> KeyFunc:
    if callable(key):
        return key  # type: ignore[no-any-return]
    if not isinstance(key, str):
        raise TypeError(f"key must be {_KEY_FORMS}; got {type(key).__name__}")
    if key == "ip":
        return _ip_source(trusted, header, prefix)
    if key == "bearer":
        return _bearer
    kind, _, name = key.partition(":")
    if kind == "header" and name:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"key {key!r}: {name!r} is not a header name")
        return _header_source(name.lower())
    if kind == "query" and name:
        return _query_source(name)
    raise ValueError(f"key must be {_KEY_FORMS}; got {key!r}")


def _label(key: Any) -> str:
    return key if isinstance(key, str) else getattr(key, "__name__", type(key).__name__)


def _first_of(keys: Sequence[Any], trusted: Tuple[_Network, ...], header: str, prefix: int) -> KeyFunc:
    if not keys:
        raise ValueError("key: an empty list names no source of the client key")
    sources: List[Tuple[str, KeyFunc]] = []
    fallback: Optional[Callable[[Request], Optional[str]]] = None
    for i, spec in enumerate(keys):
        if isinstance(spec, (list, tuple)):
            raise TypeError("key: a list of sources cannot hold another list")
        if isinstance(spec, str) and spec == "ip":
            if i != len(keys) - 1:
                raise ValueError("key: 'ip' can only be the last source of a list (used when no other is present)")
            fallback = _ip_source(trusted, header, prefix)
            continue
        sources.append((_label(spec), _source(spec, trusted, header, prefix)))
    if not sources and fallback is not None:
        return fallback
    fallback_key = fallback

    def first_present(r: Request) -> Optional[Union[str, bytes, int]]:
        found: Optional[Union[str, bytes, int]] = None
        found_in = ""
        for label, source in sources:
            value = source(r)
            if value is None:
                continue
            if found is None:
                found, found_in = value, label
            elif value != found:
                raise BadRequest(f"the client key is given twice with different values ({found_in} and {label})")
        if found is None and fallback_key is not None:
            ip = fallback_key(r)
            # "ip:" so that no credential can name an address's budget.
            return None if ip is None else f"ip:{ip}"
        return found

    return first_present


def parse_key_spec(
    key: Union[str, KeyFunc, Sequence[Union[str, KeyFunc]]],
    trusted_proxies: Iterable[str] = (),
    *,
    forwarded_header: str = "x-forwarded-for",
    ipv6_prefix: int = 64,
) -> KeyFunc:
    """The function that gives a request's client key.

    ``key`` is one source or a list of them:

    - ``"ip"``: the peer address; behind ``trusted_proxies`` (addresses or networks),
      the client address in ``forwarded_header`` (``"x-forwarded-for"``,
      ``"forwarded"`` or ``"x-real-ip"``: the one header your proxy writes; the others
      are ignored). IPv6 clients are keyed per ``/ipv6_prefix`` network (64: one
      host's rotating addresses are one client; 128: per address), IPv4-mapped IPv6
      as IPv4.
    - ``"bearer"``: the token of ``Authorization: Bearer <token>``.
    - ``"header:<name>"``, ``"query:<name>"``: that header or query parameter.
    - a callable taking a :class:`Request`; it may raise
      :class:`~nexus_limits.errors.BadRequest`.
    - a list: the first source present gives the key; two present with different
      values are a :class:`~nexus_limits.errors.BadRequest`. ``"ip"`` may close the
      list as the fallback when no other is present (keyed ``"ip:<address>"``).

    A header or query parameter repeated with different values (a comma in a key
    header counts: servers join repeats with commas) raises
    :class:`~nexus_limits.errors.BadRequest`; identical repeats count as one.
    """
    trusted = _networks(trusted_proxies)
    header = _check_forwarded_header(forwarded_header)
    prefix = _check_ipv6_prefix(ipv6_prefix)
    if isinstance(key, (list, tuple)):
        return _first_of(key, trusted, header, prefix)
    return _source(key, trusted, header, prefix)
