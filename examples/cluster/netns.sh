#!/usr/bin/env bash
# The three-server demo on three "hosts": Linux network namespaces on a bridge (needs root).
#
# Each server runs in its own namespace with its own address (10.99.0.1-3, inside the namespaces
# only), listens on it, and announces itself by multicast on its eth0; server two is server
# three's backup. Server three's log is shown; Ctrl-C (or DEMO_SECONDS=N) stops the servers and
# removes the namespaces, the bridge and the cables. Server logs: $work/{one,two,three}.log.
#
#   sudo examples/cluster/netns.sh               # twistd from PATH
#   sudo TWISTD=.venv/bin/twistd examples/cluster/netns.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
twistd=${TWISTD:-twistd}
tag=${DEMO_TAG:-stagetx-demo-$$}
subnet=10.99.0
work=$(mktemp -d)
hosts=(one two three)
pids=()

stop() {
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$tag-h1" "$tag-h2" "$tag-h3" "$tag-lan"; do
        if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
    echo "stopped; namespaces removed (logs in $work)"
}
trap stop EXIT
trap 'exit 0' INT TERM

# the LAN: a bridge in a namespace of its own, one veth cable per host
ip netns add "$tag-lan"
ip -n "$tag-lan" link add br0 type bridge mcast_snooping 0
ip -n "$tag-lan" link set br0 up
for n in 1 2 3; do
    ns="$tag-h$n"
    ip netns add "$ns"
    ip -n "$tag-lan" link add "v$n" type veth peer name eth0 netns "$ns"
    ip -n "$tag-lan" link set "v$n" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$subnet.$n/24" dev eth0
    ip -n "$ns" link set eth0 up
done

# the demo's configurations, moved onto the hosts: server N listens on 10.99.0.N (port 710N),
# announces on its eth0, and finds its backup (127.0.0.1:7102 in two.json) on host 2
ln -s "$here/lua" "$work/lua"
python3 - "$here" "$work" "$subnet" <<'EOF'
import json
import sys

here, work, subnet = sys.argv[1:]
for n, name in enumerate(["one", "two", "three"], 1):
    with open(f"{here}/{name}.json") as f:
        config = json.load(f)
    entries = []
    for entry in config["#cluster"]:
        if isinstance(entry, int):
            entries.append({"listen": f"{subnet}.{n}:{entry}"})
        elif entry.startswith("udp://"):
            entries.append(f"{entry}?interface={subnet}.{n}&ttl=1")
        else:  # a peer or backup "127.0.0.1:710K" of the demo is host K
            backup, port = entry.startswith("="), int(entry.rsplit(":", 1)[1])
            entries.append(("=" if backup else "") + f"{subnet}.{port - 7100}:{port}")
    config["#cluster"] = entries
    with open(f"{work}/{name}.json", "w") as f:
        json.dump(config, f, indent=2)
EOF

for n in 1 2 3; do
    name=${hosts[$((n - 1))]}
    : >"$work/$name.log"
    ip netns exec "$tag-h$n" "$twistd" -n --pidfile= stage -c "$work/$name.json" >"$work/$name.log" 2>&1 &
    pids+=("$!")
done
echo "three servers on $subnet.1-3; server three's log follows (Ctrl-C stops)"
tail -n +1 -f "$work/three.log" &
pids+=("$!")
if [ -n "${DEMO_SECONDS:-}" ]; then
    sleep "$DEMO_SECONDS"
else
    wait "${pids[0]}"
fi
