//! The Kubernetes resources Arges defines, as Rust types; the CRDs are generated from them
//! (`arges crds`, checked in under `deploy/crds/`).
//!
//! `metal.arges.dev/v1alpha1`, cluster-scoped: [`Server`] (one bare machine, named by its
//! SMBIOS UUID), [`ServerClass`] (a set of servers by hardware and labels) and
//! [`Environment`] (what a machine boots). `infrastructure.cluster.x-k8s.io/v1alpha2`,
//! namespaced, on the Cluster API v1beta2 infrastructure contract: [`MetalCluster`],
//! [`MetalMachine`], [`MetalMachineTemplate`] and [`MetalClusterTemplate`]. They accept the fields of the original
//! getting-started guide (`serverRef`, `bmc{endpoint,user,pass}`, `apiEndpoints`) beside
//! the contract's (`controlPlaneEndpoint`, `providerID`, `status.initialization`,
//! `status.addresses`).
//!
//! The cluster-scoped kinds carry `clusterctl.cluster.x-k8s.io/move`: `clusterctl move`
//! copies them to the new management cluster (it never deletes a cluster-scoped object
//! from the old one, nor restores any status); the infrastructure kinds move as part of
//! their Cluster.

// kube's `printcolumn(...)` repeats keys by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the bare-metal resources.
pub const METAL_GROUP: &str = "metal.arges.dev";
/// Annotation on a MetalMachine: the uid it had when it first claimed a server, which
/// names its claim. `clusterctl move` makes the machine again under a new uid but keeps
/// its annotations, so the moved machine still holds its server.
pub const CLAIM_UID_ANNOTATION: &str = "metal.arges.dev/claim-uid";
/// Label naming the appliance that discovered (and reconciles) a Server.
pub const APPLIANCE_LABEL: &str = "metal.arges.dev/appliance";
/// Label saying whether the Server's rack may run control-plane machines
/// (`[kubernetes] control_plane` of its appliance): "true" or "false".
pub const CONTROL_PLANE_RACK_LABEL: &str = "metal.arges.dev/control-plane-rack";

// ---------------------------------------------------------------- Server

/// One bare-metal machine. Created by the appliance when the machine registers, named by
/// its SMBIOS UUID; `accepted`, `cordoned` and `environmentRef` are the operator's.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "metal.arges.dev",
    version = "v1alpha1",
    kind = "Server",
    label("clusterctl.cluster.x-k8s.io/move", ""),
    status = "ServerStatus",
    doc = "A bare-metal machine known to Arges, named by its SMBIOS UUID",
    shortname = "srv",
    category = "arges",
    printcolumn(name = "Vendor", type_ = "string", json_path = ".spec.hardware.vendor"),
    printcolumn(
        name = "Product",
        type_ = "string",
        json_path = ".spec.hardware.product",
        priority = "1"
    ),
    printcolumn(
        name = "CPUs",
        type_ = "integer",
        json_path = ".spec.hardware.cpu.count",
        priority = "1"
    ),
    printcolumn(name = "Accepted", type_ = "boolean", json_path = ".spec.accepted"),
    printcolumn(name = "Cordoned", type_ = "boolean", json_path = ".spec.cordoned"),
    printcolumn(
        name = "Environment",
        type_ = "string",
        json_path = ".spec.environmentRef.name"
    ),
    printcolumn(name = "InUse", type_ = "boolean", json_path = ".status.inUse"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Clean", type_ = "boolean", json_path = ".status.clean"),
    printcolumn(name = "Power", type_ = "string", json_path = ".status.power"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The machine's SMBIOS UUID (the name too, unless two machines share one).
    #[schemars(length(min = 1, max = 128))]
    pub uuid: String,
    /// What the discovery agent found.
    #[serde(default)]
    pub hardware: ServerHardware,
    /// The machine's BMC, for power control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<Bmc>,
    /// Whether the machine may be provisioned (until then it boots its local disk).
    #[serde(default)]
    pub accepted: bool,
    /// A cordoned machine is not given to new MetalMachines and boots its local disk.
    #[serde(default)]
    pub cordoned: bool,
    /// The Environment the machine boots once accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_ref: Option<LocalRef>,
    /// What the machine does when its MetalMachine gives it back: `Wipe` (boot the wipe
    /// environment; free once it reports) or `PowerOff` (free at once). Unset: the
    /// appliance's `[kubernetes] release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleasePolicy>,
    /// Set to a new value (a timestamp, say) to arm the server: a provisioning window
    /// opens, its next boot gets its secrets, and an alarm standing on it is cleared.
    /// For machines without a BMC, and to resume after an alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub arm: Option<String>,
}

/// A Server's `spec.release`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum ReleasePolicy {
    Wipe,
    PowerOff,
}

/// Hardware facts as the discovery agent reported them.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerHardware {
    pub vendor: String,
    pub product: String,
    pub serial: String,
    pub cpu: ServerCpu,
    pub memory_bytes: u64,
    pub nics: Vec<ServerNic>,
    pub disks: Vec<ServerDisk>,
}

/// Processors.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerCpu {
    pub count: u32,
    pub model: String,
}

/// A network interface.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerNic {
    #[serde(default)]
    pub name: String,
    /// Lower-case, colon-separated (no default: a NIC without one is not a NIC).
    #[schemars(regex(pattern = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$"))]
    pub mac: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A block device.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerDisk {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub serial: String,
    pub rotational: bool,
}

/// A BMC: where it answers and how to log in. Credentials belong in a Secret; inline ones
/// (`user`, `pass`, as the original guide wrote them) work but are warned about.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bmc {
    /// `host`, `host:port`, `ipmi://host:port` or `https://host` (Redfish).
    #[schemars(length(min = 1, max = 512))]
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    /// A Secret with keys `user` and `pass` (or the keys named here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// The bmc-driver plugin to use; unset: the best probe score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Redfish: the sha256 (hex) of the BMC certificate's DER encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    /// Redfish: a PEM file of CA certificates on the appliance's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Redfish: accept any certificate (warned about on every use).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// A Secret holding credentials.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    pub name: String,
    /// The appliance's namespace when unset (the only one its RBAC reads Secrets in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_key: Option<String>,
}

/// A reference to a cluster-scoped object by name.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
pub struct LocalRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What the appliance observed of a Server.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerStatus {
    /// `on`, `off` or `unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<String>,
    /// Claimed by a MetalMachine.
    pub in_use: bool,
    /// Which MetalMachine holds the server: the cluster-wide lock, taken with a
    /// resourceVersion precondition so two machines can never hold one server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<ServerClaim>,
    /// Wiped since its last use; unset means never used, which is clean too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean: Option<bool>,
    /// `Available`, `Claimed`, `Installing`, `Installed`, `Wiping` or `Dirty`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Addresses the machine's NICs held when it last registered.
    pub addresses: Vec<MachineAddress>,
    /// The latest boot decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_boot: Option<LastBoot>,
    /// The appliance that discovered and reconciles this Server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appliance: Option<String>,
    /// The latest provisioning window: the only span its secrets go out in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowStatus>,
    /// A tripped window or a replayed secret; stands until the Server is armed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alarm: Option<AlarmStatus>,
    pub conditions: Vec<Condition>,
}

/// A Server's latest provisioning window.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct WindowStatus {
    pub id: String,
    /// `open`, `claimed`, `used`, `expired`, `tripped`, `disarmed`, `replaced` or
    /// `power-failed`.
    pub state: String,
    pub opened_at: String,
    pub expires_at: String,
    pub opened_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimant: Option<WindowClaimant>,
    /// What was handed to the claimant (never the secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued: Option<String>,
}

/// Who claimed a window.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct WindowClaimant {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What tripped a Server's window.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct AlarmStatus {
    pub time: String,
    /// `SecondRequester` or `SecretReplayed`.
    pub reason: String,
    pub message: String,
    /// The claimant's address, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    /// The address that tripped it.
    pub second: String,
}

/// The MetalMachine holding a Server.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerClaim {
    /// `namespace/name` of the MetalMachine.
    pub machine: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// The latest boot decision for a Server.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastBoot {
    /// RFC 3339.
    pub time: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// What the appliance witnessed of the machine's latest boot, step by step (the
    /// whole timeline: `arges server boots`, `GET /api/v1/servers/{id}/boots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witnessed: Option<WitnessedBoot>,
}

/// A summary of the latest boot the appliance witnessed.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WitnessedBoot {
    /// RFC 3339: its first step (a proxyDHCP answer, a power-on).
    pub started: String,
    /// Steps witnessed.
    pub steps: u32,
    /// The latest step (`dhcp`, `tftp`, `boot_script`, `fetch`, `registered`,
    /// `config_served`, `done`, `power`) and what it was about.
    pub last_step: String,
    /// Milliseconds from its first step to its latest.
    pub millis: u64,
}

/// An address of a machine, in Cluster API's shape.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
pub struct MachineAddress {
    /// `Hostname`, `InternalIP`, `ExternalIP`, `InternalDNS` or `ExternalDNS`.
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

// ---------------------------------------------------------------- ServerClass

/// A set of servers: those matching every hardware qualifier *and* the label selector.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "metal.arges.dev",
    version = "v1alpha1",
    kind = "ServerClass",
    label("clusterctl.cluster.x-k8s.io/move", ""),
    status = "ServerClassStatus",
    doc = "A set of Servers chosen by hardware qualifiers and a label selector, both of which must match",
    category = "arges",
    printcolumn(name = "Available", type_ = "integer", json_path = ".status.available"),
    printcolumn(name = "InUse", type_ = "integer", json_path = ".status.inUse"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServerClassSpec {
    #[serde(default)]
    pub qualifiers: Qualifiers,
    /// Label selector over the Servers' labels; ANDed with the qualifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Environment for servers of this class that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_ref: Option<LocalRef>,
}

/// Hardware conditions; every one given must hold.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Qualifiers {
    /// One of these vendors (exact SMBIOS system vendor).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vendors: Vec<String>,
    /// One of these products.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_disks: Option<u32>,
}

/// How many servers the class holds.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerClassStatus {
    /// Accepted, clean, uncordoned and not in use.
    pub available: u32,
    pub in_use: u32,
    pub servers: Vec<String>,
}

// ---------------------------------------------------------------- Environment

/// What a machine boots: a kernel with its arguments and initrds, from the appliance's
/// assets folder.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "metal.arges.dev",
    version = "v1alpha1",
    kind = "Environment",
    label("clusterctl.cluster.x-k8s.io/move", ""),
    doc = "A boot environment: kernel, arguments and initrds served by the appliance",
    shortname = "env",
    category = "arges",
    printcolumn(name = "Kernel", type_ = "string", json_path = ".spec.kernel.path"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentSpec {
    pub kernel: Kernel,
    #[serde(default)]
    pub initrds: Vec<Asset>,
}

/// The kernel and its command line. Each argument is a template (`{{ machine.uuid }}`,
/// `{{ boot_token }}`, … as in appliance.toml).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Kernel {
    /// Path inside the appliance's assets folder.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
}

/// A file of an environment.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Asset {
    /// Path inside the appliance's assets folder.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

// ---------------------------------------------------------------- Cluster API

/// An API endpoint (`host:port`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
pub struct ApiEndpoint {
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// The infrastructure of one Cluster API cluster on bare metal.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha2",
    kind = "MetalCluster",
    namespaced,
    status = "MetalClusterStatus",
    doc = "Cluster API infrastructure cluster for bare metal served by Arges",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha2"),
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".spec.controlPlaneEndpoint.host"
    ),
    printcolumn(
        name = "Port",
        type_ = "integer",
        json_path = ".spec.controlPlaneEndpoint.port"
    ),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.ready"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MetalClusterSpec {
    /// The control plane's endpoint (the contract's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_endpoint: Option<ApiEndpoint>,
    /// The original guide's field: the first entry is the endpoint when
    /// `controlPlaneEndpoint` is not set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_endpoints: Vec<ApiEndpoint>,
}

/// The contract's initialization status.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Initialization {
    pub provisioned: bool,
}

/// Observed state of a MetalCluster.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct MetalClusterStatus {
    /// v1beta1 contract readiness (kept for older Cluster API).
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initialization: Option<Initialization>,
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]), length(max = 32))]
    pub conditions: Vec<Condition>,
    /// The racks (appliance identities) that hold accepted, uncordoned servers: the
    /// contract's failure domains, which Cluster API copies to the Cluster and spreads
    /// control-plane Machines over.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]), length(min = 1, max = 100))]
    pub failure_domains: Vec<FailureDomain>,
}

/// One failure domain, as the v1beta2 contract lists them: a rack.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureDomain {
    /// The rack's appliance identity.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Whether control-plane Machines may go there (`[kubernetes] control_plane` of the
    /// rack's appliance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// A reference to an object, as Cluster API writes them.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One machine of a cluster, bound to a Server.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha2",
    kind = "MetalMachine",
    namespaced,
    status = "MetalMachineStatus",
    doc = "Cluster API infrastructure machine: a Server claimed for one Machine",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha2"),
    printcolumn(name = "Server", type_ = "string", json_path = ".spec.serverRef.name"),
    printcolumn(name = "ProviderID", type_ = "string", json_path = ".spec.providerID"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.ready"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MetalMachineSpec {
    /// A specific Server (the guide's way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ref: Option<ObjectRef>,
    /// Or any free Server of this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_class_ref: Option<ObjectRef>,
    /// The BMC to power the server through (else the Server's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<Bmc>,
    /// `arges://<uuid>`, set once a Server is claimed.
    #[serde(
        default,
        rename = "providerID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1, max = 512))]
    pub provider_id: Option<String>,
}

/// Observed state of a MetalMachine.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct MetalMachineStatus {
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initialization: Option<Initialization>,
    pub addresses: Vec<MachineAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]), length(max = 32))]
    pub conditions: Vec<Condition>,
    /// The rack the machine's server is in (the contract's optional field, copied to the
    /// Machine's status).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub failure_domain: Option<String>,
}

/// Template of MetalMachines, for MachineDeployments and control-plane providers.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha2",
    kind = "MetalMachineTemplate",
    namespaced,
    doc = "Template of MetalMachines for MachineDeployments and control-plane providers",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha2")
)]
#[serde(rename_all = "camelCase")]
pub struct MetalMachineTemplateSpec {
    pub template: MetalMachineTemplateResource,
}

/// The template's body.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetalMachineTemplateResource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMeta>,
    pub spec: MetalMachineSpec,
}

/// Labels and annotations a template stamps on its machines.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TemplateMeta {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Template of MetalClusters, for ClusterClasses.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1alpha2",
    kind = "MetalClusterTemplate",
    namespaced,
    doc = "Template of MetalClusters for ClusterClasses",
    category = "cluster-api",
    label("cluster.x-k8s.io/v1beta2", "v1alpha2")
)]
#[serde(rename_all = "camelCase")]
pub struct MetalClusterTemplateSpec {
    pub template: MetalClusterTemplateResource,
}

/// The template's body.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetalClusterTemplateResource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMeta>,
    pub spec: MetalClusterSpec,
}

/// Every CRD, in the order they are printed and applied.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        Server::crd(),
        ServerClass::crd(),
        Environment::crd(),
        MetalCluster::crd(),
        MetalMachine::crd(),
        MetalMachineTemplate::crd(),
        MetalClusterTemplate::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream (what `arges crds` prints).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated by `arges crds` from appliance/src/controller/resources.rs: do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        // Serializing plain data structures cannot fail.
        out.push_str(&serde_yaml_ng::to_string(&crd).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guide_s_manifests_deserialize() {
        let mm: MetalMachine = serde_yaml_ng::from_str(
            "apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2\nkind: MetalMachine\nmetadata:\n  name: controlplane-0\nspec:\n  serverRef:\n    apiVersion: metal.arges.dev/v1alpha1\n    kind: Server\n    name: 00000000-0000-0000-0000-d05099d4c8ed\n  bmc:\n    endpoint: 10.0.0.9\n    user: admin\n    pass: secret\n",
        )
        .unwrap();
        assert_eq!(
            mm.spec.server_ref.unwrap().name,
            "00000000-0000-0000-0000-d05099d4c8ed"
        );
        assert_eq!(mm.spec.bmc.unwrap().pass.as_deref(), Some("secret"));
        let mc: MetalCluster = serde_yaml_ng::from_str(
            "apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2\nkind: MetalCluster\nmetadata:\n  name: example-0\nspec:\n  apiEndpoints:\n    - host: 192.168.1.101\n      port: 6443\n",
        )
        .unwrap();
        assert_eq!(mc.spec.api_endpoints[0].port, 6443);
    }

    #[test]
    fn crds_carry_the_contract_label_and_columns() {
        let yaml = crds_yaml();
        assert!(
            yaml.contains("cluster.x-k8s.io/v1beta2: v1alpha2"),
            "{yaml}"
        );
        assert!(yaml.contains("name: servers.metal.arges.dev"));
        assert!(yaml.contains("jsonPath: .spec.accepted"));
        assert_eq!(yaml.matches("---\n").count(), 7, "seven CRDs");
    }
}
