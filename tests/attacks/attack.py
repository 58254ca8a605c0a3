#!/usr/bin/python3
"""Attack clients the attack suite (tests/tests/attacks.rs) runs inside a
sandbox. Each subcommand does one thing and prints one line saying what the
client saw; the suite decides on evidence gathered outside the sandbox.

Standard library only (the host's /usr/bin/python3)."""

import base64
import os
import socket
import ssl
import struct
import sys
import time


def out(*a):
    print(*a, flush=True)


# === TLS ClientHellos, built by the ssl module and then reshaped ===

def client_hello(sni, alpn=None):
    """The bytes of a real ClientHello for `sni` (None: no SNI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outb, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outb.read()


def add_extension(hello, ext_type, body):
    """Appends an extension to a single-record ClientHello, fixing lengths."""
    rec = bytearray(hello)
    hs = rec[5:]
    # handshake: type(1) len(3) version(2) random(32) sid
    p = 4 + 2 + 32
    p += 1 + hs[p]
    p += 2 + int.from_bytes(hs[p:p + 2], "big")  # cipher suites
    p += 1 + hs[p]  # compression
    ext_len_at = p
    ext_len = int.from_bytes(hs[p:p + 2], "big")
    ext = struct.pack(">HH", ext_type, len(body)) + body
    hs = hs[:ext_len_at] + (ext_len + len(ext)).to_bytes(2, "big") + hs[ext_len_at + 2:] + ext
    body_len = len(hs) - 4
    hs[1:4] = body_len.to_bytes(3, "big")
    return bytes(hs)  # the handshake message alone


def records(handshake, max_record=16384):
    """The handshake message framed into TLS records of at most max_record."""
    outb = b""
    for i in range(0, len(handshake), max_record):
        chunk = handshake[i:i + max_record]
        outb += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return outb


def read_reply(s, wait=3.0):
    s.settimeout(wait)
    try:
        b = s.recv(16384)
    except socket.timeout:
        return "no-reply"
    except OSError as e:
        return "reset:" + e.__class__.__name__
    if not b:
        return "closed"
    if b[0] == 21:
        return "alert:%d" % (b[6] if len(b) > 6 else -1)
    if b[0] == 22:
        return "serverhello"
    if b.startswith(b"HTTP/"):
        return "http:" + b.split(b" ", 2)[1].decode()
    return "bytes:%d" % len(b)


def cmd_hello(dst, port, sni, shape):
    """Sends a reshaped ClientHello to dst:port; prints what came back."""
    sni = None if sni == "-" else sni
    placeholder = None
    if sni and sni[0].isdigit():
        # The ssl module sends no SNI for IP literals: write a name of the
        # same length and replace its bytes.
        placeholder = ("x" * (len(sni) - 5)) + ".test"
        raw = client_hello(placeholder)
        raw = raw.replace(placeholder.encode(), sni.encode())
    else:
        raw = client_hello(sni)
    hs = raw[5:]
    if shape == "oversized":
        hs = add_extension(raw, 0x1A1A, b"\x00" * 17000)
    elif shape == "pq":
        # The size of a hello with an X25519MLKEM768 key share (~1.8 KB),
        # in an extension a server ignores (a GREASE type).
        hs = add_extension(raw, 0x1A1A, b"\x00" * 1300)
    elif shape == "ech":
        hs = add_extension(raw, 0xFE0D, b"\x00\x00\x01\x00\x01\x01" + os.urandom(32) + b"\x00\x80" + os.urandom(128))
    s = socket.create_connection((dst, int(port)), timeout=5)
    if shape == "split":
        half = len(hs) // 2
        s.sendall(records(hs[:half]) + records(hs[half:]))
    elif shape == "bytewise":
        for b in records(hs):
            s.send(bytes([b]))
            time.sleep(0.002)
    else:
        s.sendall(records(hs))
    out(read_reply(s))


# === HTTP/1 over TLS (the sandbox's trust) or plaintext ===

def connect_tls(host, port=443, sni=None, alpn=None):
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    s = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(s, server_hostname=sni or host)


def read_all(s, wait=5.0):
    s.settimeout(wait)
    buf = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            buf += b
    except (socket.timeout, ssl.SSLError, OSError):
        pass
    return buf


def statuses(buf):
    return [l.split(b" ")[1].decode() for l in buf.split(b"\r\n") if l.startswith(b"HTTP/1.")]


SMUGGLE = {
    "cl-te": b"POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "te-cl": b"POST /echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    "te-obfuscated": b"POST /echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-trailing-space": b"POST /echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked \r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "cl-duplicate": b"POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-plus": b"POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: +5\r\n\r\nhello",
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: {h}\r\nX-A: a\r\n b\r\n\r\n",
    "pipelined-evil-host": b"GET /echo HTTP/1.1\r\nHost: {h}\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    "fronting-host": b"GET /echo HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    "absolute-evil": b"GET http://evil.test/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "trace": b"TRACE /echo HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "sandbox-authorization": b"GET /echo HTTP/1.1\r\nHost: {h}\r\nAuthorization: Bearer sandbox-own\r\nauthorization: Basic c2FuZGJveA==\r\nProxy-Authorization: x\r\n\r\n",
}


def generated(case, host):
    """Request heads too big to be reasonable."""
    if case == "header-100k":
        return ("GET /echo HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n" % (host, "a" * 100_000)).encode()
    if case == "headers-1000":
        many = "".join("X-H%d: v\r\n" % i for i in range(1000))
        return ("GET /echo HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (host, many)).encode()
    return None


def cmd_h1(host, case, tls="tls", port=None):
    payload = generated(case, host) or SMUGGLE[case].replace(b"{h}", host.encode())
    debug = os.environ.get("ATTACK_DEBUG")
    if tls == "tls":
        s = connect_tls(host, int(port or 443))
    else:
        s = socket.create_connection((host, int(port or 80)), timeout=10)
    note = ""
    try:
        s.sendall(payload)
    except (OSError, ssl.SSLError):
        note = " send-failed"
    buf = read_all(s, 5.0)
    if debug:
        sys.stderr.write(repr(buf[-600:]) + "\n")
    out("statuses:" + ",".join(statuses(buf)) + " leaked:" + str(leaks(buf)) + note)


SECRET = os.environ.get("ATTACK_SECRET", "")


def leaks(buf):
    if not SECRET:
        return False
    b64 = base64.b64encode(SECRET.encode())
    return SECRET.encode() in buf or b64 in buf


def cmd_get(host, path, port="443"):
    s = connect_tls(host, int(port))
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)).encode())
    buf = read_all(s, 10.0)
    out("statuses:" + ",".join(statuses(buf)) + " leaked:" + str(leaks(buf)))


def cmd_slow_headers(host, seconds):
    """Intercepted: a request head sent one byte a second."""
    s = connect_tls(host, 443)
    head = ("GET /slow HTTP/1.1\r\nHost: %s\r\nX-Pad: %s\r\n\r\n" % (host, "a" * 200)).encode()
    start = time.time()
    try:
        for b in head:
            s.send(bytes([b]))
            time.sleep(1.0)
            if time.time() - start > float(seconds):
                break
    except OSError:
        out("closed-after:%d" % int(time.time() - start))
        return
    out("open-after:%d" % int(time.time() - start))


def cmd_slowloris(dst, port, conns, seconds):
    """Many connections, each sending one byte now and then, never a full
    ClientHello; prints how many the proxy had closed at the end."""
    socks = []
    for _ in range(int(conns)):
        try:
            s = socket.create_connection((dst, int(port)), timeout=5)
            s.send(b"\x16")
            socks.append(s)
        except OSError:
            pass
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        time.sleep(1.0)
        for s in socks:
            try:
                s.send(b"\x03")
            except OSError:
                pass
    closed = 0
    for s in socks:
        s.settimeout(0.2)
        try:
            if s.recv(1) == b"":
                closed += 1
        except socket.timeout:
            pass
        except OSError:
            closed += 1
    out("opened:%d closed:%d" % (len(socks), closed))


# === HTTP/2, framed by hand ===

def frame(ftype, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def literal(name, value):
    """HPACK literal header field without indexing, no Huffman."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + hpack_len(len(v)) + v


def hpack_len(n):
    if n < 127:
        return bytes([n])
    out_ = bytearray([127])
    n -= 127
    while n >= 128:
        out_.append((n & 0x7F) | 0x80)
        n >>= 7
    out_.append(n)
    return bytes(out_)


def h2_headers(host, path="/echo", extra=(), authority=None):
    block = literal(":method", "GET") + literal(":scheme", "https") + literal(":path", path)
    block += literal(":authority", authority or host)
    for k, v in extra:
        block += literal(k, v)
    return block


def h2_conn(host):
    s = connect_tls(host, 443, alpn=["h2"])
    if s.selected_alpn_protocol() != "h2":
        raise SystemExit("no h2: %r" % s.selected_alpn_protocol())
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
    return s


def h2_read(s, wait=5.0):
    """Frames until the peer closes or goes quiet: (types seen, statuses)."""
    buf = read_all(s, wait)
    kinds, statuses_, i = [], [], 0
    while i + 9 <= len(buf):
        ln = int.from_bytes(buf[i:i + 3], "big")
        t, fl = buf[i + 3], buf[i + 4]
        payload = buf[i + 9:i + 9 + ln]
        kinds.append(t)
        if t == 1:
            statuses_.append(h2_status(payload, fl))
        i += 9 + ln
    return kinds, statuses_


# HPACK's Huffman codes of the digits (RFC 7541 Appendix B): all a
# :status value can hold.
HUFFMAN_DIGITS = {"00000": "0", "00001": "1", "00010": "2", "011001": "3", "011010": "4",
                  "011011": "5", "011100": "6", "011101": "7", "011110": "8", "011111": "9"}


def h2_status(payload, flags):
    """The :status of a HEADERS frame (the first field of a response)."""
    p = 0
    if flags & 0x8:
        p += 1
    if flags & 0x20:
        p += 5
    while p < len(payload) and payload[p] & 0xE0 == 0x20:
        p += 1  # dynamic table size update
    if p >= len(payload):
        return "?"
    b = payload[p]
    if b & 0x80:
        return {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}.get(b & 0x7F, "?")
    if b not in (0x48, 0x08, 0x18):
        return "?"
    huff, n = payload[p + 1] & 0x80, payload[p + 1] & 0x7F
    raw = payload[p + 2:p + 2 + n]
    if not huff:
        return raw.decode(errors="replace")
    bits = "".join("{:08b}".format(c) for c in raw)
    outd, cur = "", ""
    for bit in bits:
        cur += bit
        if cur in HUFFMAN_DIGITS:
            outd += HUFFMAN_DIGITS[cur]
            cur = ""
            if len(outd) == 3:
                break
    return outd or "?"


def cmd_h2(host, case):
    s = h2_conn(host)
    if case == "authority-evil":
        s.sendall(frame(1, 0x5, 1, h2_headers(host, authority="evil.test")))
    elif case == "crlf-value":
        s.sendall(frame(1, 0x5, 1, h2_headers(host, extra=[("x-a", "v\r\nhost: evil.test")])))
    elif case == "te-header":
        s.sendall(frame(1, 0x5, 1, h2_headers(host, extra=[("transfer-encoding", "chunked")])))
    elif case == "cl-mismatch":
        block = h2_headers(host, extra=[("content-length", "100")])
        s.sendall(frame(1, 0x4, 1, block) + frame(0, 0x1, 1, b"x" * 5))
    elif case == "coalesce-allowed":
        # A second authority on the connection the first one opened.
        s.sendall(frame(1, 0x5, 1, h2_headers(host)) + frame(1, 0x5, 3, h2_headers(host, authority="allowed.test")))
    elif case == "rapid-reset":
        batch = b""
        for i in range(1000):
            sid = 2 * i + 1
            batch += frame(1, 0x5, sid, h2_headers(host, path="/reset")) + frame(3, 0, sid, b"\x00\x00\x00\x08")
        try:
            s.sendall(batch)
        except OSError:
            pass
    elif case == "continuation-flood":
        data = frame(1, 0x0, 1, h2_headers(host))
        data += b"".join(frame(9, 0, 1, b"") for _ in range(2000))
        data += b"".join(frame(9, 0, 1, literal("x-f", "a" * 100)) for _ in range(2000))
        try:
            s.sendall(data)
        except OSError:
            pass
    elif case == "settings-flood":
        try:
            s.sendall(b"".join(frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64") for _ in range(20000)))
        except OSError:
            pass
    elif case == "ping-flood":
        try:
            s.sendall(b"".join(frame(6, 0, 0, b"12345678") for _ in range(20000)))
        except OSError:
            pass
    kinds, st = h2_read(s, 5.0)
    out("goaway:%s rst:%s statuses:%s" % (7 in kinds, 3 in kinds, ",".join(st)))


# === plain sockets ===

def cmd_tcp(dst, port, send=""):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((dst, int(port)))
        if send:
            s.sendall(send.encode().decode("unicode_escape").encode("latin-1"))
        r = read_reply(s, 3.0)
        out("connected " + r)
    except OSError as e:
        out("refused:" + e.__class__.__name__)


def cmd_udp(dst, port, payload="hello"):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.sendto(payload.encode(), (dst, int(port)))
        s.recv(2048)
        out("answered")
    except OSError as e:
        out("no-answer:" + e.__class__.__name__)


def cmd_quic(dst):
    """A QUIC v1 Initial-shaped datagram (long header) to dst:443."""
    pkt = bytes([0xC3]) + b"\x00\x00\x00\x01" + b"\x08" + os.urandom(8) + b"\x00" + b"\x00" + b"\x44\xd0" + os.urandom(1200)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.sendto(pkt, (dst, 443))
        s.recv(2048)
        out("answered")
    except OSError as e:
        out("no-answer:" + e.__class__.__name__)


def dns_query(name, qtype, edns=False, ident=0x4242):
    q = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 1 if edns else 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    if edns:
        pad = struct.pack(">HH", 12, 64) + b"\x00" * 64
        q += b"\x00" + struct.pack(">HHIH", 41, 4096, 0, len(pad)) + pad
    return q


QTYPES = {"A": 1, "NULL": 10, "TXT": 16, "AAAA": 28, "ANY": 255}


def cmd_dns(server, name, qtype="A", transport="udp", edns="no"):
    q = dns_query(name, QTYPES[qtype], edns == "edns")
    try:
        if transport == "tcp":
            s = socket.create_connection((server, 53), timeout=3)
            s.sendall(len(q).to_bytes(2, "big") + q)
            r = s.recv(4096)[2:]
        else:
            s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.sendto(q, (server, 53))
            r = s.recv(4096)
        rcode = r[3] & 0x0F
        out("rcode:%d answers:%d" % (rcode, int.from_bytes(r[6:8], "big")))
    except OSError as e:
        out("no-answer:" + e.__class__.__name__)


def cmd_rebind_loop(host, rounds):
    """Resolves through the sandbox resolver and connects, again and again."""
    ok = 0
    for _ in range(int(rounds)):
        try:
            s = socket.create_connection((host, 80), timeout=2)
            s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
            s.recv(100)
            ok += 1
        except OSError:
            pass
    out("answered:%d" % ok)


def cmd_listen(port, seconds):
    """Listens on TCP port for `seconds`; prints how many connected."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(port)))
    srv.listen(16)
    srv.settimeout(0.2)
    n, end = 0, time.time() + float(seconds)
    while time.time() < end:
        try:
            c, _ = srv.accept()
            n += 1
            c.close()
        except socket.timeout:
            pass
    out("accepted:%d" % n)


COMMANDS = {
    "hello": cmd_hello,
    "h1": cmd_h1,
    "get": cmd_get,
    "h2": cmd_h2,
    "tcp": cmd_tcp,
    "udp": cmd_udp,
    "quic": cmd_quic,
    "dns": cmd_dns,
    "rebind": cmd_rebind_loop,
    "slowloris": cmd_slowloris,
    "slow-headers": cmd_slow_headers,
    "listen": cmd_listen,
}

if __name__ == "__main__":
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except SystemExit:
        raise
    except Exception as e:  # the suite reads the line, never a traceback
        out("error:%s:%s" % (e.__class__.__name__, e))
