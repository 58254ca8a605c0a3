"""Calls the test origin's gRPC echo service with a real gRPC client
(Debian's python3-grpcio; run it with /usr/bin/python3) and prints one JSON
object.

    grpc_call.py HOST PORT CAFILE [--name NAME] [--metadata KEY=VALUE]...
                 [--messages N] [--timeout SECONDS]

HOST:PORT is what the channel connects to (a name the sandbox resolves, or
an address); the certificate is verified against CAFILE for NAME (default
HOST), which is also the :authority. Methods are called generically (bytes
in, bytes out, no generated stubs):

* /grpc.test.Echo/Unary: one call with a binary message;
* /grpc.test.Echo/Stream: a bidirectional call that sends N messages plus
  one of 200 KiB, each only after the echo of the previous one arrived (so
  it proves the server answers message by message).

Output: {"unary": {...}, "stream": {...}} with, per call, "ok", "code",
"details", "sent_hex"/"reply_hex" (lists for the stream; the 200 KiB message
is reported by sha256 instead), "initial_metadata" and "trailing_metadata"
as [key, value] lists. Exit status 0 when both calls returned OK with the
echo of what was sent, else 1.
"""

import argparse
import hashlib
import json
import queue
import sys

import grpc

BIG = 200 * 1024


def pairs(md):
    out = []
    for k, v in md or ():
        if isinstance(v, bytes):
            v = v.decode("latin-1")
        out.append([k, v])
    return out


def show(msg):
    if len(msg) > 4096:
        return "sha256:" + hashlib.sha256(msg).hexdigest()
    return msg.hex()


def unary(channel, metadata, timeout):
    call = channel.unary_unary("/grpc.test.Echo/Unary")
    sent = b"unary \x00\x01\xfe\xff " + bytes(range(256))
    out = {"ok": False, "sent_hex": show(sent)}
    try:
        reply, c = call.with_call(sent, metadata=metadata, timeout=timeout)
        out.update(
            ok=reply == sent,
            code=c.code().name,
            details=c.details(),
            reply_hex=show(reply),
            initial_metadata=pairs(c.initial_metadata()),
            trailing_metadata=pairs(c.trailing_metadata()),
        )
    except grpc.RpcError as e:
        out.update(code=e.code().name, details=e.details())
    return out


def stream(channel, metadata, timeout, n):
    call = channel.stream_stream("/grpc.test.Echo/Stream")
    msgs = [("stream message %d " % i).encode() * (i + 1) for i in range(n)]
    msgs.append(bytes((i * 7) & 0xFF for i in range(BIG)))
    echoed = queue.Queue()
    out = {"ok": False, "sent_hex": [show(m) for m in msgs], "interleaved": True}

    def requests():
        for i, m in enumerate(msgs):
            yield m
            # Send the next message only once this one came back.
            try:
                echoed.get(timeout=timeout)
            except queue.Empty:
                out["interleaved"] = False
                return

    replies = []
    try:
        c = call(requests(), metadata=metadata, timeout=timeout)
        for r in c:
            replies.append(r)
            echoed.put(r)
        out.update(
            ok=replies == msgs and out["interleaved"],
            code=c.code().name,
            details=c.details(),
            initial_metadata=pairs(c.initial_metadata()),
            trailing_metadata=pairs(c.trailing_metadata()),
        )
    except grpc.RpcError as e:
        out.update(code=e.code().name, details=e.details())
    out["reply_hex"] = [show(r) for r in replies]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("cafile")
    ap.add_argument("--name")
    ap.add_argument("--metadata", action="append", default=[])
    ap.add_argument("--messages", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=15.0)
    a = ap.parse_args()

    with open(a.cafile, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = []
    if a.name:
        options += [
            ("grpc.ssl_target_name_override", a.name),
            ("grpc.default_authority", a.name),
        ]
    host = "[%s]" % a.host if ":" in a.host else a.host
    metadata = []
    for kv in a.metadata:
        k, _, v = kv.partition("=")
        metadata.append((k.lower(), v))

    with grpc.secure_channel("%s:%d" % (host, a.port), creds, options=options) as ch:
        out = {
            "unary": unary(ch, metadata, a.timeout),
            "stream": stream(ch, metadata, a.timeout, a.messages),
        }
    print(json.dumps(out))
    return 0 if out["unary"]["ok"] and out["stream"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
