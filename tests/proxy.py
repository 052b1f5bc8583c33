"""Owns `LoopbackProxy`, a fault-injecting TCP proxy in front of a Redis server; called by tests.

The proxy listens on a free 127.0.0.1 port and forwards bytes both ways to a target
server. It reads the client's RESP stream far enough to find each command's name
(commands split across TCP reads are reassembled first) and the server's stream far
enough to count replies, so it can lose exactly the reply to an EXEC (or to a flush
script sent outside MULTI, the whole transaction of a flush made only of increments):

```python
with LoopbackProxy(host, port) as proxy:
    engine = redmap.create_engine(proxy.url, socket_timeout=0.5)
    proxy.set_mode("drop_exec_reply", once=True)
    session.commit()            # EXEC applied by the server, its reply never arrives
    assert proxy.exec_seen == 1
```

Modes (switchable at run time with `set_mode`):

* `pass`: forward both ways.
* `drop_exec_reply`: forward the client's bytes untouched up to and including an EXEC;
  once the server has answered that EXEC (so it applied it), swallow the answer and
  everything after it and close both sides: a reply lost after the server applied EXEC.
* `drop_exec`: forward everything before an EXEC, never the EXEC itself, and close both
  sides: the server discards the open MULTI, the transaction does not apply.
* `blackhole`: accept connections and forward nothing either way; clients time out.
  Connections blackholed are closed when the proxy leaves this mode.
* `reset`: close every open connection at once, and every new one as soon as accepted.

A flush script (an `EVAL`/`EVALSHA` naming a flush token) sent outside MULTI counts as
an EXEC for the two EXEC modes and in the EXEC counters: it is a commit point of its own.

With `once=True` the two EXEC modes fire on the next EXEC only; when that fault is
complete the proxy switches to the mode given as `then` (default `pass`), so
`set_mode("drop_exec_reply", once=True, then="reset")` loses an EXEC reply and then
makes the server unreachable. `reset` with `once=True` closes the open connections
and switches to `then` at once.

Everything runs in one background thread (a `selectors` loop over non-blocking
sockets); `stop()` (or leaving the `with` block) closes every socket and joins it.
Replies are counted in RESP2 and RESP3; out-of-band RESP3 pushes are forwarded and not
counted. `CLIENT REPLY OFF|SKIP` would confuse the count and is not supported.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, get_args

__all__ = ["LoopbackProxy", "Mode"]

Mode = Literal["pass", "drop_exec_reply", "drop_exec", "blackhole", "reset"]
_MODES: frozenset[str] = frozenset(get_args(Mode))

_RECV_SIZE = 65536
_LINE_TYPES = frozenset(b"+-:_,#(")
_BULK_TYPES = frozenset(b"$!=")
_ARRAY_TYPES = frozenset(b"*~>")
_MAP_TYPES = frozenset(b"%|")


class ProtocolError(ValueError):
    """Bytes that are not RESP: the proxy stops interpreting that stream."""


def _line_end(buf: bytes | bytearray, pos: int) -> int | None:
    """Index just past the CRLF ending the line at `pos`, or None if it has not arrived."""
    end = buf.find(b"\r\n", pos)
    return None if end < 0 else end + 2


def _int_line(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """The integer after the type byte at `pos` and the index past its line."""
    end = _line_end(buf, pos)
    if end is None:
        return None
    try:
        return int(bytes(buf[pos + 1 : end - 2])), end
    except ValueError:
        raise ProtocolError(f"bad length line {bytes(buf[pos:end])!r}") from None


def _element_end(buf: bytes | bytearray, pos: int) -> int | None:
    """Index just past the RESP2/RESP3 element starting at `pos`, or None if incomplete."""
    if pos >= len(buf):
        return None
    kind = buf[pos]
    if kind in _LINE_TYPES:
        return _line_end(buf, pos)
    header = _int_line(buf, pos)
    if header is None:
        return None
    count, end = header
    if kind in _BULK_TYPES:
        if count < 0:
            return end
        stop = end + count + 2
        return stop if len(buf) >= stop else None
    if kind in _ARRAY_TYPES or kind in _MAP_TYPES:
        children = count * 2 if kind in _MAP_TYPES else count
        for _ in range(max(children, 0)):
            child = _element_end(buf, end)
            if child is None:
                return None
            end = child
        return end
    raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")


class _CommandScanner:
    """Splits a client's byte stream into whole commands: (upper-case name, raw bytes)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Whole commands completed by `data`; an incomplete tail waits for more bytes."""
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while self._buf:
            if self._buf[0] == ord("*"):
                end = _element_end(self._buf, 0)
                if end is None:
                    break
                frame = bytes(self._buf[:end])
                name = _first_bulk(frame)
            else:  # an inline command: words on one line
                line_end = _line_end(self._buf, 0)
                if line_end is None:
                    break
                frame = bytes(self._buf[:line_end])
                words = frame.split()
                name = words[0] if words else b""
            del self._buf[: len(frame)]
            out.append((name.upper(), frame))
        return out

    def take_rest(self) -> bytes:
        """The unparsed tail (after a protocol error), emptying the buffer."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _first_bulk(frame: bytes) -> bytes:
    """The first element of a command array (its name), or b"" when there is none."""
    header = _int_line(frame, 0)
    assert header is not None
    count, pos = header
    if count < 1 or pos >= len(frame):
        return b""
    if frame[pos] != ord("$"):
        raise ProtocolError("command arrays hold bulk strings")
    bulk = _int_line(frame, pos)
    assert bulk is not None
    size, start = bulk
    return frame[start : start + max(size, 0)]


class _ReplyScanner:
    """Splits a server's byte stream into whole replies: (counts as a reply, raw bytes)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bool, bytes]]:
        self._buf += data
        out: list[tuple[bool, bytes]] = []
        while self._buf:
            pos = 0
            # RESP3 attributes belong to the reply that follows them.
            while pos < len(self._buf) and self._buf[pos] == ord("|"):
                attr_end = _element_end(self._buf, pos)
                if attr_end is None:
                    return out
                pos = attr_end
            end = _element_end(self._buf, pos)
            if end is None:
                break
            is_push = self._buf[pos] == ord(">")
            frame = bytes(self._buf[:end])
            del self._buf[:end]
            out.append((not is_push, frame))
        return out

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


@dataclass(eq=False)
class _Link:
    """One client connection and, unless blackholed, its connection to the server."""

    client: socket.socket
    upstream: socket.socket | None
    to_client: bytearray = field(default_factory=bytearray)
    to_upstream: bytearray = field(default_factory=bytearray)
    commands: _CommandScanner = field(default_factory=_CommandScanner)
    replies: _ReplyScanner = field(default_factory=_ReplyScanner)
    # After a protocol error the stream is forwarded without interpretation.
    opaque_up: bool = False
    opaque_down: bool = False
    # Commands forwarded to the server, and replies received from it.
    sent: int = 0
    answered: int = 0
    # Index of the forwarded EXEC whose reply is to be swallowed (drop_exec_reply).
    swallow_from: int | None = None
    # This link carries a once-only fault: switch to the follow-up mode when it ends.
    pending_then: Mode | None = None
    blackholed: bool = False
    closed: bool = False
    # Between MULTI and EXEC/DISCARD: a script there is queued, not a commit point.
    in_multi: bool = False


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 in front of a Redis server, with switchable faults.

    Counters (read at any time): `exec_seen` (EXEC commands received from clients),
    `exec_forwarded`, `exec_dropped` (EXECs never forwarded), `exec_replies_dropped`
    (EXEC replies swallowed after the server sent them), `connections` (accepted).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self.exec_seen = 0
        self.exec_forwarded = 0
        self.exec_dropped = 0
        self.exec_replies_dropped = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self._armed = False  # a once-only fault waits for its EXEC
        self._once = False
        self._then: Mode = "pass"
        self._links: list[_Link] = []
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LoopbackProxy:
        """Bind a free loopback port and start forwarding in a background thread."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            wake_r, wake_w = socket.socketpair()
        except BaseException:
            listener.close()
            raise
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._listener, self._wake_r, self._wake_w = listener, wake_r, wake_w
        self._port = int(listener.getsockname()[1])
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "accept")
        selector.register(wake_r, selectors.EVENT_READ, "wake")
        self._selector = selector
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"redmap-proxy-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and join the thread (idempotent)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout=10)
        if thread.is_alive():  # pragma: no cover - the loop wakes within its poll interval
            raise RuntimeError("proxy thread did not stop")
        self._thread = None
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None

    def __enter__(self) -> LoopbackProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`: connect here to go through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._mode

    @property
    def alive(self) -> bool:
        """Whether the forwarding thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def set_mode(self, mode: Mode, *, once: bool = False, then: Mode = "pass") -> None:
        """Switch mode; with `once`, an EXEC mode fires on the next EXEC only, then `then`."""
        if mode not in _MODES or then not in _MODES:
            raise ValueError(f"unknown proxy mode {mode!r} / {then!r}; one of {sorted(_MODES)}")
        if once and mode not in ("drop_exec_reply", "drop_exec", "reset"):
            raise ValueError(f"mode {mode!r} cannot be used once")
        with self._lock:
            self._mode = mode
            self._once = once
            self._then = then
            self._armed = once
            if mode == "reset" and once:
                self._mode = then
        self._wake()

    # -- the loop (proxy thread only below) -----------------------------------------------

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping.is_set():
                self._apply_mode()
                for key, events in selector.select(timeout=0.2):
                    tag = key.data
                    if tag == "wake":
                        self._drain_wake()
                    elif tag == "accept":
                        self._accept()
                    else:
                        assert isinstance(tag, tuple)
                        link, side = tag
                        if link.closed:
                            continue
                        if events & selectors.EVENT_READ:
                            self._readable(link, side)
                        if not link.closed and events & selectors.EVENT_WRITE:
                            self._writable(link, side)
                self._links = [link for link in self._links if not link.closed]
        finally:
            for link in list(self._links):
                self._close(link)
            self._links.clear()

    def _apply_mode(self) -> None:
        """Act on a mode switch for the connections already open.

        `reset` closes them; `blackhole` stops forwarding on them; leaving `blackhole`
        closes the ones it swallowed bytes from, whose streams can no longer be resumed.
        """
        with self._lock:
            mode = self._mode
        for link in self._links:
            if mode == "reset" or (link.blackholed and mode != "blackhole"):
                self._close(link)
            elif mode == "blackhole":
                link.blackholed = True

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            with self._lock:
                self.connections += 1
                mode = self._mode
            if mode == "reset":
                _hard_close(client)
                continue
            client.setblocking(False)
            upstream: socket.socket | None = None
            if mode != "blackhole":
                try:
                    upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
                except OSError:
                    _hard_close(client)
                    continue
                upstream.setblocking(False)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream, blackholed=upstream is None)
            self._links.append(link)
            self._selector.register(client, selectors.EVENT_READ, (link, "client"))
            if upstream is not None:
                self._selector.register(upstream, selectors.EVENT_READ, (link, "upstream"))

    def _readable(self, link: _Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        assert sock is not None
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(link)
            return
        with self._lock:
            if self._mode == "blackhole":
                link.blackholed = True
        if link.blackholed:
            return
        if side == "client":
            self._from_client(link, data)
        else:
            self._from_upstream(link, data)
        self._update_interest(link)

    def _from_client(self, link: _Link, data: bytes) -> None:
        if link.swallow_from is not None:
            return  # the connection is being torn down; nothing more goes to the server
        if link.opaque_up:
            link.to_upstream += data
            return
        try:
            commands = link.commands.feed(data)
        except ProtocolError:
            link.opaque_up = True
            link.to_upstream += link.commands.take_rest()
            return
        for name, frame in commands:
            if name == b"MULTI":
                link.in_multi = True
            elif name == b"DISCARD":
                link.in_multi = False
            if name == b"EXEC" or (
                name in (b"EVAL", b"EVALSHA") and not link.in_multi and b"#flush:" in frame
            ):
                link.in_multi = False
                if self._on_exec(link, frame):
                    return
            else:
                link.to_upstream += frame
                if name:  # Redis answers every command; empty lines get no reply
                    link.sent += 1

    def _on_exec(self, link: _Link, frame: bytes) -> bool:
        """Apply the mode to one EXEC; True when the link stops forwarding."""
        with self._lock:
            self.exec_seen += 1
            mode = self._mode
            fires = mode in ("drop_exec_reply", "drop_exec") and (self._armed or not self._once)
            if fires and self._once:
                self._armed = False
                link.pending_then = self._then
            if mode == "drop_exec" and fires:
                self.exec_dropped += 1
            else:
                self.exec_forwarded += 1
        if not fires:
            link.to_upstream += frame
            link.sent += 1
            return False
        if mode == "drop_exec":
            self._close(link)
            return True
        link.to_upstream += frame
        link.swallow_from = link.sent
        link.sent += 1
        return True

    def _from_upstream(self, link: _Link, data: bytes) -> None:
        if link.opaque_down:
            if link.swallow_from is None:
                link.to_client += data
            return
        try:
            replies = link.replies.feed(data)
        except ProtocolError:
            link.opaque_down = True
            if link.swallow_from is None:
                link.to_client += link.replies.take_rest()
            return
        for counted, frame in replies:
            if counted:
                index = link.answered
                link.answered += 1
                if link.swallow_from is not None and index >= link.swallow_from:
                    with self._lock:
                        self.exec_replies_dropped += 1
                    # The server has applied the EXEC; lose its reply. Replies before it
                    # reach the client first, as they would on a real network.
                    self._flush_then_close(link)
                    return
            link.to_client += frame

    def _flush_then_close(self, link: _Link) -> None:
        if link.to_client:
            try:
                link.client.setblocking(True)
                link.client.settimeout(1.0)
                link.client.sendall(bytes(link.to_client))
            except OSError:
                pass
            link.to_client.clear()
        self._close(link)

    def _writable(self, link: _Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        buf = link.to_client if side == "client" else link.to_upstream
        assert sock is not None
        if buf:
            try:
                sent = sock.send(buf)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(link)
                return
            del buf[:sent]
        self._update_interest(link)

    def _update_interest(self, link: _Link) -> None:
        if link.closed:
            return
        assert self._selector is not None
        # Push what can go without waiting; register for writability only for the rest.
        for sock, buf, side in (
            (link.client, link.to_client, "client"),
            (link.upstream, link.to_upstream, "upstream"),
        ):
            if sock is None:
                continue
            if buf:
                try:
                    del buf[: sock.send(buf)]
                except BlockingIOError:
                    pass
                except OSError:
                    self._close(link)
                    return
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
            self._selector.modify(sock, events, (link, side))

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            if self._selector is not None:
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            _hard_close(sock)
        then = link.pending_then
        if then is not None:
            link.pending_then = None
            with self._lock:
                self._mode = then
                self._once = False
                self._armed = False


def _hard_close(sock: socket.socket) -> None:
    """Close at once: the peer sees the connection end, whatever was buffered."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
