#!/usr/bin/env bash
# A Kubernetes node for the tests: containerd and kubelet, run in the foreground until
# killed. Run it inside the network namespace the node lives in (nsenter --net, not
# `ip netns exec`, which hides the cgroup mounts kubelet needs):
#
#   node.sh DIR NAME NODE_IP KUBECONFIG
#
# DIR holds everything the node writes: containerd's root and state, kubelet's root, pod
# logs, CNI state, and the host paths pods mount (/var/lib/arges, say). The node runs in a
# private mount namespace where those host paths are DIR's, so a test never touches the
# machine's own /var/lib or /var/log. Its pods get addresses from the CNI bridge plugin
# on 10.244.0.0/24 (Debian's plugins; no masquerade, no kube-proxy: the test's apiserver
# listens on the kubernetes Service's address itself). Its kubepods cgroups live under
# /arges-node-NAME in every cgroup v1 hierarchy; the test removes them after it (see
# tests/support/src/node.rs).
set -euo pipefail
dir="$1" name="$2" node_ip="$3" kubeconfig="$4"
bin="${ARGES_K8S_BIN:?set ARGES_K8S_BIN to the folder of tests/k8s/build-binaries.sh}"
runtime="$bin/containerd"
. "$(dirname "$0")/../../deploy/versions.env"
pause_image="$PAUSE_IMAGE"

if [ -z "${ARGES_NODE_MOUNTS:-}" ]; then
  export ARGES_NODE_MOUNTS=1
  exec unshare --mount --propagation private -- "$0" "$@"
fi

# The host paths a node writes, each replaced by DIR's own folder.
for p in /var/lib/arges /var/log/pods /var/log/containers /var/lib/cni /etc/cni/net.d /run/containerd; do
  mkdir -p "$p" "$dir/host$p"
  mount --bind "$dir/host$p" "$p"
done

# The kubepods cgroup root, in every v1 hierarchy (cpuset needs its cpus and mems set
# before anything can join it).
cgroup_root="/arges-node-$name"
for h in /sys/fs/cgroup/*/; do
  [ "$h" = /sys/fs/cgroup/unified/ ] && continue
  mkdir -p "$h$cgroup_root"
done
cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset$cgroup_root/cpuset.cpus"
cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset$cgroup_root/cpuset.mems"

cat > /etc/cni/net.d/10-pods.conflist <<EOF
{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "10.244.0.0/24" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "loopback" }
  ]
}
EOF
echo 1 > /proc/sys/net/ipv4/ip_forward

cat > "$dir/containerd.toml" <<EOF
version = 3
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$pause_image"
[plugins.'io.containerd.cri.v1.runtime']
  # The test runs without CAP_SYS_RESOURCE: no negative OOM scores.
  restrict_oom_score_adj = true
  # Pods' network namespaces under the state folder, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
EOF

cat > "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 controllers (with an empty cgroup2 beside them).
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $cgroup_root
containerRuntimeEndpoint: unix://$dir/containerd.sock
address: $node_ip
readOnlyPort: 0
# The apiserver reaches the kubelet (logs, exec) without client certificates.
authentication:
  anonymous: { enabled: true }
  webhook: { enabled: false }
authorization: { mode: AlwaysAllow }
# Without CAP_SYS_RESOURCE the kubelet cannot lower its own OOM score.
oomScoreAdj: 0
evictionHard:
  memory.available: 100Mi
  nodefs.available: 500Mi
  imagefs.available: 500Mi
# The images were imported, not pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
resolvConf: /etc/resolv.conf
EOF

pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait
}
trap stop EXIT TERM INT

PATH="$runtime:$PATH" "$runtime/containerd" --config "$dir/containerd.toml" >"$dir/containerd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/containerd.sock" ] && break; sleep 0.1; done
[ -S "$dir/containerd.sock" ] || { echo "containerd did not start:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1; }

"$bin/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$kubeconfig" --root-dir="$dir/kubelet" \
  --hostname-override="$name" --node-ip="$node_ip" --v=2 >"$dir/kubelet.log" 2>&1 &
pids+=($!)
wait -n "${pids[@]}"
echo "the node stopped: a process exited" >&2
