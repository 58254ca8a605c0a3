"""WebSocket echo round trips with a real client (Debian's
python3-websockets; run it with /usr/bin/python3), printing one JSON object.

    ws_echo.py HOST PORT CAFILE [--name NAME] [--path /ws] [--plain]
               [--header KEY=VALUE]...

Connects to HOST:PORT, opens wss://NAME:PORT/PATH (verifying the certificate
against CAFILE for NAME, default HOST; ws:// with --plain) and checks that a
text message, a 200 KiB binary message and a fragmented message come back
unchanged and that a ping is answered. Output: {"ok", "text", "binary",
"fragmented", "ping", "close_code", "error"}. Exit status 0 when all held.
"""

import argparse
import asyncio
import json
import ssl
import sys

import websockets


async def run(a):
    name = a.name or a.host
    scheme = "ws" if a.plain else "wss"
    uri = "%s://%s:%d%s" % (scheme, name, a.port, a.path)
    kwargs = {"host": a.host, "port": a.port, "compression": None, "max_size": 1 << 25}
    if not a.plain:
        kwargs["ssl"] = ssl.create_default_context(cafile=a.cafile)
        kwargs["server_hostname"] = name
    headers = [tuple(h.split("=", 1)) for h in a.header]
    if headers:
        kwargs["extra_headers"] = headers
    out = {"ok": False}
    async with websockets.connect(uri, open_timeout=10, **kwargs) as ws:
        text = "hello websocket \u00e9\u4e16"
        await ws.send(text)
        out["text"] = (await asyncio.wait_for(ws.recv(), 10)) == text

        binary = bytes((i * 13) & 0xFF for i in range(200 * 1024))
        await ws.send(binary)
        out["binary"] = (await asyncio.wait_for(ws.recv(), 10)) == binary

        await ws.send(iter(["frag-1 ", "frag-2 ", "frag-3"]))
        out["fragmented"] = (await asyncio.wait_for(ws.recv(), 10)) == "frag-1 frag-2 frag-3"

        pong = await ws.ping(b"tollgate-ping")
        await asyncio.wait_for(pong, 10)
        out["ping"] = True
        await ws.close()
        out["close_code"] = ws.close_code
    out["ok"] = all(out.get(k) for k in ("text", "binary", "fragmented", "ping"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("cafile")
    ap.add_argument("--name")
    ap.add_argument("--path", default="/ws")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--header", action="append", default=[])
    a = ap.parse_args()
    try:
        out = asyncio.run(run(a))
    except Exception as e:  # report, don't trace
        out = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
