"""HTTPS GET from inside a sandbox, for the proxy tests.

    tls_get.py CONNECT_HOST PORT SNI CAFILE PATH [--chunked-hello]

Connects to CONNECT_HOST:PORT (the address the sandbox *thinks* it talks
to), sends a TLS ClientHello with server name SNI, verifies the certificate
against CAFILE for SNI, requests PATH and prints one JSON line: the outcome,
the certificate's subject CN, the body size and its sha256. With
--chunked-hello the ClientHello is written one byte per TCP segment.
"""

import hashlib
import json
import socket
import ssl
import sys
import time


def main():
    host, port, sni, cafile, path = sys.argv[1:6]
    chunked = "--chunked-hello" in sys.argv[6:]
    out = {"ok": False}
    ctx = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection((host, int(port)), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if chunked:
            inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ctx.wrap_bio(inc, outg, server_hostname=sni)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            hello = outg.read()
            for b in hello:
                raw.sendall(bytes([b]))
                time.sleep(0.002)
            # Finish the handshake over the memory BIOs.
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pending = outg.read()
                    if pending:
                        raw.sendall(pending)
                    data = raw.recv(65536)
                    if not data:
                        raise ConnectionError("closed during handshake")
                    inc.write(data)
            pending = outg.read()
            if pending:
                raw.sendall(pending)
            cert = obj.getpeercert()
            obj.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            raw.sendall(outg.read())
            body = b""
            while True:
                try:
                    chunk = obj.read(65536)
                    if not chunk:
                        break
                    body += chunk
                except ssl.SSLWantReadError:
                    data = raw.recv(65536)
                    if not data:
                        break
                    inc.write(data)
                except ssl.SSLZeroReturnError:
                    break
        else:
            tls = ctx.wrap_socket(raw, server_hostname=sni)
            cert = tls.getpeercert()
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            h = hashlib.sha256()
            body_len = 0
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                head += chunk
            header, _, rest = head.partition(b"\r\n\r\n")
            h.update(rest)
            body_len += len(rest)
            while True:
                try:
                    chunk = tls.recv(1 << 20)
                except (ssl.SSLZeroReturnError, ConnectionResetError):
                    break
                if not chunk:
                    break
                h.update(chunk)
                body_len += len(chunk)
            out.update(ok=True, status=header.split(b"\r\n")[0].decode(), bytes=body_len, sha256=h.hexdigest())
        if chunked:
            header, _, rest = body.partition(b"\r\n\r\n")
            out.update(ok=True, status=header.split(b"\r\n")[0].decode(), bytes=len(rest),
                       sha256=hashlib.sha256(rest).hexdigest())
        subject = dict(x[0] for x in cert.get("subject", ()))
        out["cert_cn"] = subject.get("commonName")
        issuer = dict(x[0] for x in cert.get("issuer", ()))
        out["issuer_cn"] = issuer.get("commonName")
    except ssl.SSLError as e:
        out["error"] = f"ssl:{e.reason or e}"
    except (OSError, ConnectionError) as e:
        out["error"] = f"os:{e}"
    finally:
        raw.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
