"""The official leap0 Python SDK against a tollgate daemon.

Run by tests/tests/sdk.rs with LEAP0_BASE_URL and LEAP0_API_KEY pointing at a
test daemon. Exits non-zero (with the failing step) on any SDK error or
unexpected answer.
"""

import sys

from leap0 import Leap0Client

POLICY = {
    "mode": "custom",
    "allow_domains": ["pypi.org", "*.pythonhosted.org"],
    "allow_cidrs": ["192.168.50.0/24"],
    "transforms": [
        {
            "domain": "api.openai.com",
            "inject_headers": {"Authorization": "Bearer sk-sdk-secret-value"},
            "strip_headers": ["X-Api-Key"],
        }
    ],
}


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    client = Leap0Client(sdk_otel_enabled=False)
    try:
        sb = client.sandboxes.create(memory=512, timeout=600, env_vars={"GREETING": "hi"})
        check(sb.id.startswith("sbx-"), f"create returned id {sb.id!r}")
        check(str(getattr(sb.state, "value", sb.state)) == "running", f"create state {sb.state!r}")

        res = sb.process.execute(command="echo $GREETING; id -u")
        check(res.exit_code == 0, f"execute exit code {res.exit_code} stderr {res.stderr!r}")
        check(res.stdout.splitlines()[0] == "hi", f"env_vars not set: {res.stdout!r}")

        snap = sb.create_snapshot(name="sdk-snap")
        check(snap.name == "sdk-snap" and snap.id.startswith("snp-"), f"snapshot {snap!r}")

        restored = client.snapshots.restore(snapshot_name="sdk-snap", network_policy=POLICY, timeout=900)
        check(restored.id != sb.id, "restore returned the source sandbox")
        policy = restored.network_policy
        check(policy["mode"] == "custom", f"restored policy {policy!r}")
        check(policy["allow_domains"] == ["pypi.org", "*.pythonhosted.org"], f"domains {policy!r}")
        injected = policy["transforms"][0]["inject_headers"]["Authorization"]
        check("sk-sdk-secret" not in injected, "secret returned by the API")

        res = restored.process.execute(command="echo $GREETING")
        check(res.exit_code == 0, f"execute in the restored sandbox: exit {res.exit_code} stderr {res.stderr!r}")
        check(res.stdout.strip() == "hi", f"restored sandbox env: {res.stdout!r}")

        got = client.sandboxes.get(restored.id)
        check(got.id == restored.id and got.timeout == 900, f"get {got!r}")

        listed = client.sandboxes.list(page_size=50)
        ids = {item.id for item in listed.items}
        check({sb.id, restored.id} <= ids and listed.total_items >= 2, f"list {ids!r}")

        snaps = client.snapshots.list()
        check(any(s.name == "sdk-snap" for s in snaps.items), "snapshot not listed")

        paused = client.sandboxes.pause(sb.id)
        check(str(getattr(paused.state, "value", paused.state)) == "paused", f"pause state {paused.state!r}")

        restored.delete()
        sb.delete()
        remaining = {item.id for item in client.sandboxes.list().items}
        check(not ({sb.id, restored.id} & remaining), f"deleted sandboxes still listed: {remaining!r}")
        client.snapshots.delete(snap.id)
        check(not any(s.name == "sdk-snap" for s in client.snapshots.list().items), "snapshot not deleted")
    finally:
        client.close()
    print("leap0 SDK round trip: OK")


if __name__ == "__main__":
    main()
