"""The controller at fleet scale, side by side: two appliance binaries (before and now)
against a real etcd and kube-apiserver, N Servers spread over M appliance identities.

Per binary and N it reports, for the appliances at steady state (after every Server is
visible and a settling pause): apiserver requests per minute per appliance (from the
apiserver's audit log, each appliance authenticating as its own user), bytes the
appliances read from the apiserver per minute (their sockets' bytes_received, from `ss`),
resident memory per appliance (and its growth per Server it holds), the time from a
registration to its Server being visible, from a MetalMachine apply to its server
claimed (bound: `spec.serverRef` set), and from 50 MetalMachines applied at once to all
claimed. The MetalMachines are what Cluster API would make: each owned by a Machine of a
provisioned Cluster with its bootstrap data, none in a failure domain, so every
appliance races for each (the resourceVersion precondition picks one). Everything
listens on loopback; every load is bounded by count and time.

Run by fleet-scale.sh, which builds the binaries and the control plane.
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

REG_TOKEN = "registration-token-for-bench-01"
ADMIN_TOKEN = "admin-token-for-bench-000000001"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, secs, check, step=0.2):
    deadline = time.time() + secs
    while time.time() < deadline:
        if check():
            return
        time.sleep(step)
    raise SystemExit(f"error: {what}: not within {secs} s")


class ControlPlane:
    """etcd and kube-apiserver with token users and an audit log of every request."""

    def __init__(self, k8s, appliances):
        self.k8s = k8s
        self.dir = tempfile.mkdtemp(prefix="arges-fleet-")
        d = self.dir
        subprocess.run(["openssl", "genrsa", "-out", f"{d}/sa.key", "2048"], check=True,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["openssl", "rsa", "-in", f"{d}/sa.key", "-pubout", "-out",
                        f"{d}/sa.pub"], check=True, stderr=subprocess.DEVNULL)
        self.tokens = {"admin": "admin-" + "0" * 32}
        for i in range(appliances):
            self.tokens[f"rack-{i}"] = f"rack-{i}-" + "1" * 32
        with open(f"{d}/tokens.csv", "w") as f:
            for n, (user, token) in enumerate(self.tokens.items()):
                f.write(f'{token},{user},{n + 1},"system:masters"\n')
        with open(f"{d}/audit.yaml", "w") as f:
            f.write("apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
                    "rules:\n- level: Metadata\n")
        client, peer = free_port(), free_port()
        self.procs = [subprocess.Popen(
            [f"{k8s}/etcd", "--name", "default", "--unsafe-no-fsync",
             f"--data-dir={d}/etcd", f"--listen-client-urls=http://127.0.0.1:{client}",
             f"--advertise-client-urls=http://127.0.0.1:{client}",
             f"--listen-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-cluster=default=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=open(f"{d}/etcd.log", "w"))]
        self.port = free_port()
        self.procs.append(subprocess.Popen(
            [f"{k8s}/kube-apiserver", f"--etcd-servers=http://127.0.0.1:{client}",
             f"--secure-port={self.port}", "--bind-address=127.0.0.1",
             "--advertise-address=127.0.0.1", f"--cert-dir={d}/certs",
             f"--token-auth-file={d}/tokens.csv", "--authorization-mode=RBAC",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             f"--service-account-key-file={d}/sa.pub",
             f"--service-account-signing-key-file={d}/sa.key",
             "--service-cluster-ip-range=10.96.0.0/24",
             f"--audit-policy-file={d}/audit.yaml", f"--audit-log-path={d}/audit.log",
             "--audit-log-maxsize=0"],
            stdout=subprocess.DEVNULL, stderr=open(f"{d}/apiserver.log", "w")))
        for user, token in self.tokens.items():
            self.kubeconfig(user, token)
        wait("kube-apiserver ready", 120,
             lambda: self.kubectl_ok(["get", "--raw", "/readyz"]), 0.5)

    def kubeconfig(self, user, token):
        path = f"{self.dir}/{user}.kubeconfig"
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {{server: "https://127.0.0.1:{self.port}", insecure-skip-tls-verify: true}}
users:
- name: {user}
  user: {{token: "{token}"}}
contexts:
- name: bench
  context: {{cluster: bench, user: {user}}}
current-context: bench
""")
        return path

    def kubectl(self, args, stdin=None):
        return subprocess.run([f"{self.k8s}/kubectl", "--kubeconfig",
                               f"{self.dir}/admin.kubeconfig", *args], input=stdin,
                              capture_output=True, text=True)

    def kubectl_ok(self, args):
        return self.kubectl(args).returncode == 0

    def audit_counts(self, since):
        """Requests per user logged after byte offset `since`, and the new offset."""
        counts, kinds = {}, {}
        with open(f"{self.dir}/audit.log", "rb") as f:
            f.seek(since)
            data = f.read()
        for line in data.splitlines():
            try:
                event = json.loads(line)
                user = event["user"]["username"]
            except (ValueError, KeyError):
                continue
            # A watch is logged when its response starts and again when it ends: once.
            if event.get("stage") == "ResponseStarted":
                continue
            counts[user] = counts.get(user, 0) + 1
            if user == "rack-0":
                kind = (event.get("verb"), event.get("objectRef", {}).get("resource"))
                kinds[kind] = kinds.get(kind, 0) + 1
        return counts, kinds, since + len(data)

    def audit_size(self):
        return os.path.getsize(f"{self.dir}/audit.log")

    def stop(self):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Appliance:
    def __init__(self, binary, cp, identity):
        self.dir = tempfile.mkdtemp(prefix=f"arges-{identity}-")
        d = self.dir
        with open(f"{d}/appliance.toml", "w") as f:
            f.write(f"""http.boot_per_source_per_sec = 0
http.registrations_per_source_per_sec = 0
http.max_connections_per_source = 100000
[tokens]
registration = "{REG_TOKEN}"
admin = "{ADMIN_TOKEN}"
[policy]
max_unaccepted = 1000000
[kubernetes]
kubeconfig = "{cp.dir}/{identity}.kubeconfig"
identity = "{identity}"
namespace = "arges-system"
""")
        self.proc = subprocess.Popen(
            [binary, "run", "--config", f"{d}/appliance.toml", "--data-dir", f"{d}/data",
             "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0", "--ready-file",
             f"{d}/ready.json"],
            stdout=subprocess.DEVNULL, stderr=open(f"{d}/log", "w"),
            env={**os.environ,
                 "ARGES_LOG": os.environ.get("ARGES_BENCH_LOG", "info,kube_client=error")})
        wait(f"{identity} started", 60, lambda: os.path.exists(f"{d}/ready.json"))
        host, port = json.load(open(f"{d}/ready.json"))["http"][0].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def register(self, i):
        mac = "52:54:00:%02x:%02x:%02x" % (i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff)
        uuid = "00000000-0000-4000-8000-%012x" % i
        body = json.dumps({"uuid": uuid, "mode": "discover", "hardware": {
            "vendor": "QEMU", "product": "Standard PC", "cpu": {"count": 4, "model": "x"},
            "memory_bytes": 8 << 30, "nics": [{"name": "eth0", "mac": mac}],
            "disks": [{"name": "vda", "size_bytes": 20 << 30}]}})
        for attempt in range(5):
            try:
                self.conn.request("POST", "/api/v1/register", body, {
                    "Authorization": f"Bearer {REG_TOKEN}",
                    "Content-Type": "application/json"})
                r = self.conn.getresponse()
                r.read()
                if r.status == 200:
                    return uuid
                raise SystemExit(f"error: registration {i}: HTTP {r.status}")
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                time.sleep(0.1 * (attempt + 1))
        raise SystemExit(f"error: registration {i} failed")

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self, signalled, deadline):
        """Waits for the exit of an appliance sent SIGTERM at `signalled`, killing it at
        `deadline`; the seconds it took."""
        try:
            self.proc.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if os.environ.get("ARGES_BENCH_KEEP"):
            print(f"    kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return time.time() - signalled


class Api:
    """The apiserver's REST API as the admin user, over one kept-alive connection."""

    def __init__(self, port, token):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        self.token = token

    def call(self, method, path, body=None, patch=False):
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = ("application/merge-patch+json" if patch
                                       else "application/json")
        for attempt in range(5):
            try:
                self.conn.request(method, path, data, headers)
                r = self.conn.getresponse()
                raw = r.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                time.sleep(0.1 * (attempt + 1))
                continue
            if r.status == 409 and patch:
                continue
            if r.status >= 300:
                raise SystemExit(f"error: {method} {path}: HTTP {r.status}: {raw[:400]!r}")
            return json.loads(raw) if raw else None
        raise SystemExit(f"error: {method} {path}: no answer")


CAPI = "/apis/cluster.x-k8s.io/v1beta2/namespaces/default"
# How long 50 MetalMachines applied at once may take to be claimed before the run gives
# up on the rest (and says how many were).
FIFTY_WITHIN = 120
ONE_WITHIN = 60
METAL = "/apis/infrastructure.cluster.x-k8s.io/v1alpha2/namespaces/default/metalmachines"


def provisioned_cluster(api):
    """A Cluster whose infrastructure is provisioned and bootstrap data for its machines,
    as Cluster API and its bootstrap provider would leave them."""
    api.call("POST", "/api/v1/namespaces/default/secrets", {
        "metadata": {"name": "bootstrap"},
        "data": {"value": base64.b64encode(b"#!talos\nversion: v1alpha1\n").decode()}})
    api.call("POST", f"{CAPI}/clusters", {
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Cluster",
        "metadata": {"name": "bench"},
        "spec": {"infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io",
                                       "kind": "MetalCluster", "name": "bench"}}})
    api.call("PATCH", f"{CAPI}/clusters/bench/status", {
        "status": {"initialization": {"infrastructureProvisioned": True}}}, patch=True)


def machine(api, name):
    """A Machine of the Cluster; the owner reference its MetalMachine carries."""
    m = api.call("POST", f"{CAPI}/machines", {
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": "bench"}},
        "spec": {"clusterName": "bench", "version": "v1.35.4",
                 "bootstrap": {"dataSecretName": "bootstrap"},
                 "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io",
                                       "kind": "MetalMachine", "name": name}}})
    return {"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine", "name": name,
            "uid": m["metadata"]["uid"], "controller": True}


def apply_metal_machine(api, name, owner):
    api.call("POST", METAL, {
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha2", "kind": "MetalMachine",
        "metadata": {"name": name, "ownerReferences": [owner]},
        "spec": {"serverClassRef": {"name": "qemu"}}})


def claimed(api):
    """Names of the MetalMachines bound to a server."""
    items = api.call("GET", METAL)["items"]
    return {i["metadata"]["name"] for i in items
            if (i.get("spec", {}).get("serverRef") or {}).get("name")}


def claim_times(api, names, secs):
    """Applies MetalMachines `names` (their Machines made first) at once; the seconds
    from the first apply until each is claimed."""
    owners = {n: machine(api, n) for n in names}
    start = time.time()
    for n in names:
        apply_metal_machine(api, n, owners[n])
    took, deadline = {}, start + secs
    while len(took) < len(names) and time.time() < deadline:
        done = claimed(api)
        for n in names:
            if n in done and n not in took:
                took[n] = time.time() - start
        time.sleep(0.02)
    # Not all claimed in time: the bound is reported as the figure, and how many made it.
    return [took.get(n, float("inf")) for n in names]


def bytes_received(pids, port):
    """Bytes the processes `pids` have read on each of their connections to `port`
    (ss -tinp), by the connection's local port."""
    out = subprocess.run(["ss", "-tinpH", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True).stdout
    read, conn = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            owned = any(f"pid={p}," in line for p in pids)
            conn = fields[3] if owned and len(fields) > 3 else None
            continue
        m = re.search(r"bytes_received:(\d+)", line)
        if conn and m:
            read[conn] = int(m.group(1))
    return read


def read_between(before, after):
    """Bytes read between two `bytes_received` snapshots: the growth of each connection
    open at the end (all of it for one opened meanwhile); a connection closed meanwhile
    is not counted, so this is a lower bound."""
    return sum(n - before.get(conn, 0) for conn, n in after.items())


CLASS = """apiVersion: metal.arges.dev/v1alpha1
kind: ServerClass
metadata: {name: qemu}
spec:
  qualifiers: {vendors: [QEMU]}
"""


def run(binary, k8s, crds, n, m, settle, steady):
    cp = ControlPlane(k8s, m)
    apps = []
    try:
        out = cp.kubectl(["apply", "-f", crds])
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        # Cluster API's Machines and Clusters, which the provider watches (as installed
        # on a management cluster; without them its watches would fail and re-list).
        for kind in ["machines", "clusters"]:
            out = cp.kubectl(["apply", "--server-side", "-f",
                              f"{k8s}/capi/crds/cluster.x-k8s.io_{kind}.yaml"])
            if out.returncode != 0:
                raise SystemExit(out.stderr)
        cp.kubectl(["create", "namespace", "arges-system"])
        cp.kubectl(["apply", "-f", "-"], CLASS)
        apps = [Appliance(binary, cp, f"rack-{i}") for i in range(m)]
        rss_empty = statistics.mean(a.rss_kib() for a in apps)
        api = Api(cp.port, cp.tokens["admin"])
        started = time.time()
        for i in range(n):
            apps[i % m].register(i + 1)
            if (i + 1) % 1000 == 0:
                print(f"    {i + 1}/{n} registered", file=sys.stderr)
        wait(f"{n} Servers visible", 600, lambda: len(
            cp.kubectl(["get", "servers", "--no-headers", "-o", "name"]).stdout.split()) >= n, 1)
        print(f"    {n} Servers visible after {time.time() - started:.1f} s; accepting them",
              file=sys.stderr)
        for s in api.call("GET", "/apis/metal.arges.dev/v1alpha1/servers")["items"]:
            api.call("PATCH", f"/apis/metal.arges.dev/v1alpha1/servers/{s['metadata']['name']}",
                     {"spec": {"accepted": True}}, patch=True)
        provisioned_cluster(api)
        print(f"    settling {settle} s", file=sys.stderr)
        time.sleep(settle)
        pids = [a.proc.pid for a in apps]
        offset = cp.audit_size()
        read0, t0 = bytes_received(pids, cp.port), time.time()
        time.sleep(steady)
        counts, kinds, _ = cp.audit_counts(offset)
        print("    rack-0's requests: " + ", ".join(
            f"{v} {r}: {c}" for (v, r), c in sorted(kinds.items(), key=lambda x: -x[1])),
            file=sys.stderr)
        read1, minutes = bytes_received(pids, cp.port), (time.time() - t0) / 60
        per_app = [counts.get(f"rack-{i}", 0) / minutes for i in range(m)]
        rss = [a.rss_kib() for a in apps]
        # A registration to its Server being visible, five times.
        latencies = []
        for k in range(5):
            t = time.time()
            uuid = apps[0].register(n + 100 + k)
            wait("a new Server visible", 60,
                 lambda: cp.kubectl_ok(["get", "server", uuid]), 0.02)
            latencies.append(time.time() - t)
        # A MetalMachine applied to its server claimed, three times one by one; then 50
        # at once.
        one = [claim_times(api, [f"one-{k}"], ONE_WITHIN)[0] for k in range(3)]
        fifty = claim_times(api, [f"fifty-{k}" for k in range(50)], FIFTY_WITHIN)
        return {
            "req_per_min": statistics.mean(per_app),
            "req_per_min_max": max(per_app),
            "kib_read_per_min": read_between(read0, read1) / 1024 / minutes / m,
            "rss_mib": statistics.mean(rss) / 1024,
            # Each leader holds its own Servers and a projection of every Server of the
            # fleet (class counts, placement): growth per Server of the fleet.
            "rss_kib_per_server": (statistics.mean(rss) - rss_empty) / n,
            "visible_s": statistics.median(latencies),
            "claim_s": statistics.median(one),
            "fifty_s": max(fifty),
            "fifty_p50_s": statistics.median(fifty),
            "fifty_claimed": sum(t != float("inf") for t in fifty),
        }
    finally:
        # All at once, and all killed 40 s later at the latest: each may drain a while.
        signalled = time.time()
        for a in apps:
            a.proc.send_signal(signal.SIGTERM)
        took = [a.stop(signalled, signalled + 40) for a in apps]
        if took:
            print(f"    appliances stopped in at most {max(took):.1f} s", file=sys.stderr)
        cp.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True)
    p.add_argument("--now", required=True)
    p.add_argument("--k8s", required=True)
    p.add_argument("--crds", required=True)
    p.add_argument("--n", default="100,1000,5000")
    p.add_argument("--m", type=int, default=10)
    p.add_argument("--settle", type=int, default=20)
    p.add_argument("--steady", type=int, default=60)
    a = p.parse_args()
    rows = []
    for n in [int(x) for x in a.n.split(",")]:
        # --before "": the current binary alone.
        for name, binary in [("before", a.before), ("now", a.now)]:
            if not binary:
                continue
            print(f"==> N={n}, M={a.m}, {name}", file=sys.stderr)
            r = run(binary, a.k8s, a.crds, n, a.m, a.settle, a.steady)
            rows.append((n, name, r))
            # Said at once too: a long run cut short keeps what it measured.
            print(f"    {json.dumps(r)}", file=sys.stderr)
    print(f"\nFleet scale, M={a.m} appliances, steady state over {a.steady} s after "
          f"{a.settle} s settling (2 cores):")
    print(f"{'N':>6} {'binary':>7} {'req/min/appl.':>14} {'(max)':>7} "
          f"{'KiB read/min/appl.':>19} {'RSS MiB/appl.':>14} {'KiB/server':>11} "
          f"{'register->visible s':>20} {'apply->claimed s':>17} {'50: all s':>10} "
          f"{'(p50)':>6}")
    for n, name, r in rows:
        print(f"{n:>6} {name:>7} {r['req_per_min']:>14.1f} {r['req_per_min_max']:>7.1f} "
              f"{r['kib_read_per_min']:>19.1f} {r['rss_mib']:>14.1f} "
              f"{r['rss_kib_per_server']:>11.1f} {r['visible_s']:>20.2f} "
              f"{r['claim_s']:>17.2f} {r['fifty_s']:>10.2f} {r['fifty_p50_s']:>6.2f}"
              + ("" if r["fifty_claimed"] == 50 else
                 f"  (only {r['fifty_claimed']} of 50 claimed within {FIFTY_WITHIN} s)"))


if __name__ == "__main__":
    main()
