"""Sends probes from inside a sandbox's network namespace and reports, one
JSON line per probe, whether an answer came back.

    probe.py tcp 198.51.100.10 80   udp 10.99.0.10 9999   icmp 198.51.100.10

Run as `nsenter --net=/run/netns/tollgate-<id> python3 probe.py ...` by the
egress tests. It only reports what the client saw; the tests assert on what
the canary received.
"""

import json
import socket
import subprocess
import sys

TIMEOUT = 1.5


def tcp(addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((addr, int(port)))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(64)
        return "answered" if data else "closed"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except OSError as e:
        return f"error:{e.errno}"
    finally:
        s.close()


def udp(addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.sendto(b"probe", (addr, int(port)))
        s.recvfrom(64)
        return "answered"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except OSError as e:
        return f"error:{e.errno}"
    finally:
        s.close()


def icmp(addr):
    cmd = ["ping", "-6" if ":" in addr else "-4", "-c", "1", "-W", "1", addr]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=5)
        return "answered" if r.returncode == 0 else "timeout"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error:{e}"


def main(args):
    i = 0
    while i < len(args):
        kind = args[i]
        if kind == "icmp":
            res, probe = icmp(args[i + 1]), args[i : i + 2]
            i += 2
        else:
            fn = tcp if kind == "tcp" else udp
            res, probe = fn(args[i + 1], args[i + 2]), args[i : i + 3]
            i += 3
        print(json.dumps({"probe": " ".join(probe), "result": res}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
