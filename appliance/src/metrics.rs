//! The appliance's Prometheus metrics: one struct, registered once, shared by every edge.
//!
//! Labels are small closed sets (error kinds, routes, actions) taken from the `kind()` of
//! each module's error enum, so a dashboard can tell *what* went wrong without reading logs.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label pair; values come from closed sets, so cardinality stays bounded.
pub type Labels = [(&'static str, &'static str); 1];
/// Two label pairs, same rule.
pub type Labels2 = [(&'static str, &'static str); 2];

/// Every metric the appliance exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<Labels2, Counter>,
    pub http_bytes_sent: Counter,
    pub http_tls_failures: Family<Labels, Counter>,
    pub tftp_requests: Family<Labels, Counter>,
    pub tftp_transfers: Family<Labels, Counter>,
    pub tftp_active: Gauge,
    pub tftp_bytes_sent: Counter,
    pub tftp_retransmits: Counter,
    pub tftp_errors: Family<Labels, Counter>,
    pub boot_decisions: Family<Labels, Counter>,
    pub registrations: Family<Labels, Counter>,
    pub configdata: Family<Labels, Counter>,
    pub provisioning_windows: Family<Labels, Counter>,
    pub identity_alarms: Family<Labels, Counter>,
    pub secrets_issued: Family<Labels, Counter>,
    pub boot_script_seconds: Histogram,
    pub policy_fallbacks: Counter,
    /// Audit entries stored, by outcome (ok, refused, failed).
    pub audit_entries: Family<Labels, Counter>,
    /// Audit entries dropped before they were stored (the inventory not taking them).
    pub audit_dropped: Counter,
    pub plugin_calls: Family<PluginLabels, Counter>,
    pub plugin_loads: Family<PluginLabels, Counter>,
    /// Time of one plugin call, by plugin (a chain's plugins told apart).
    pub plugin_call_seconds: Family<PluginName, Histogram, fn() -> Histogram>,
    pub plugins_active: Gauge,
    pub dhcp_requests: Family<Labels, Counter>,
    pub dhcp_replies: Family<Labels2, Counter>,
    pub boot_to_registration_seconds: Histogram,
    pub controller_syncs: Family<Labels2, Counter>,
    pub controller_leader: Gauge,
    pub bmc_operations: Family<Labels2, Counter>,
    pub bmc_operation_seconds: Histogram,
    pub bmc_retries: Family<Labels, Counter>,
    pub provisioning_steps: Family<Labels2, Counter>,
    pub capi_reconciles: Family<Labels2, Counter>,
    /// Requests or connections refused by an abuse limit, by edge and limit.
    pub limited: Family<Labels2, Counter>,
}

/// Labels naming a plugin (names are operator-chosen file names, so bounded by the folder).
pub type PluginLabels = [(&'static str, String); 2];
/// A plugin's name alone, same rule.
pub type PluginName = [(&'static str, String); 1];

/// 5 µs (a warm decision) to about 42 s (a BMC driver step waiting on its BMC).
pub const PLUGIN_CALL_BUCKETS: (f64, f64, u16) = (0.000_005, 2.0, 24);

fn plugin_call_histogram() -> Histogram {
    let (start, factor, count) = PLUGIN_CALL_BUCKETS;
    Histogram::new(exponential_buckets(start, factor, count))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `arges` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("arges");
        let m = Metrics {
            http_requests: Family::default(),
            http_bytes_sent: Counter::default(),
            tftp_requests: Family::default(),
            tftp_transfers: Family::default(),
            tftp_active: Gauge::default(),
            tftp_bytes_sent: Counter::default(),
            tftp_retransmits: Counter::default(),
            tftp_errors: Family::default(),
            boot_decisions: Family::default(),
            registrations: Family::default(),
            configdata: Family::default(),
            provisioning_windows: Family::default(),
            identity_alarms: Family::default(),
            secrets_issued: Family::default(),
            boot_script_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            policy_fallbacks: Counter::default(),
            audit_entries: Family::default(),
            audit_dropped: Counter::default(),
            plugin_calls: Family::default(),
            plugin_loads: Family::default(),
            plugin_call_seconds: Family::new_with_constructor(plugin_call_histogram),
            plugins_active: Gauge::default(),
            dhcp_requests: Family::default(),
            dhcp_replies: Family::default(),
            // TCG virtual machines take 10-40 s, real servers minutes (POST, RAID init).
            boot_to_registration_seconds: Histogram::new(exponential_buckets(1.0, 1.5, 16)),
            controller_syncs: Family::default(),
            controller_leader: Gauge::default(),
            bmc_operations: Family::default(),
            // A status read is ~10 ms on a LAN; a power-on confirmed by polling, seconds.
            bmc_operation_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            bmc_retries: Family::default(),
            provisioning_steps: Family::default(),
            capi_reconciles: Family::default(),
            limited: Family::default(),
            http_tls_failures: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "http_requests",
            "HTTP requests by route and status class",
            m.http_requests.clone(),
        );
        r.register(
            "http_body_bytes_sent",
            "HTTP body bytes sent",
            m.http_bytes_sent.clone(),
        );
        r.register(
            "tftp_requests",
            "TFTP requests by result",
            m.tftp_requests.clone(),
        );
        r.register(
            "tftp_transfers",
            "Finished TFTP transfers by outcome",
            m.tftp_transfers.clone(),
        );
        r.register(
            "tftp_active_transfers",
            "TFTP transfers in progress",
            m.tftp_active.clone(),
        );
        r.register(
            "tftp_bytes_sent",
            "TFTP payload bytes sent",
            m.tftp_bytes_sent.clone(),
        );
        r.register(
            "tftp_retransmits",
            "TFTP packets sent again after a timeout or loss",
            m.tftp_retransmits.clone(),
        );
        r.register(
            "tftp_errors",
            "Malformed or refused TFTP packets by kind",
            m.tftp_errors.clone(),
        );
        r.register(
            "boot_decisions",
            "Boot decisions by action",
            m.boot_decisions.clone(),
        );
        r.register(
            "registrations",
            "Agent registrations by result",
            m.registrations.clone(),
        );
        r.register(
            "configdata_requests",
            "/configdata requests by result",
            m.configdata.clone(),
        );
        r.register(
            "provisioning_windows",
            "Provisioning window events (opened, armed, claimed, used, tripped, disarmed, power-failed)",
            m.provisioning_windows.clone(),
        );
        r.register(
            "identity_alarms",
            "Alarms raised by a second requester in a window or a replayed secret, by kind",
            m.identity_alarms.clone(),
        );
        r.register(
            "secrets_issued",
            "Secrets handed to booting machines, by kind",
            m.secrets_issued.clone(),
        );
        r.register(
            "boot_script_seconds",
            "Time to decide and render a boot script",
            m.boot_script_seconds.clone(),
        );
        r.register(
            "audit_entries",
            "Audit log entries stored, by outcome (ok, refused, failed)",
            m.audit_entries.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit log entries dropped before they were stored (the inventory was not taking them)",
            m.audit_dropped.clone(),
        );
        r.register(
            "policy_fallbacks",
            "Boot decisions made by the built-in policy because the active policy failed",
            m.policy_fallbacks.clone(),
        );
        r.register(
            "plugin_calls",
            "Plugin decisions by plugin and result",
            m.plugin_calls.clone(),
        );
        r.register(
            "plugin_loads",
            "Plugin loads by plugin and result",
            m.plugin_loads.clone(),
        );
        r.register(
            "plugin_call_seconds",
            "Time of one plugin call by plugin, instantiation included",
            m.plugin_call_seconds.clone(),
        );
        r.register(
            "plugins_active",
            "Plugins loaded and in the chain",
            m.plugins_active.clone(),
        );
        r.register(
            "dhcp_requests",
            "DHCP packets received by the proxy, by result (answered, or why not)",
            m.dhcp_requests.clone(),
        );
        r.register(
            "dhcp_replies",
            "proxyDHCP answers by client kind (pxe, http, ipxe) and firmware",
            m.dhcp_replies.clone(),
        );
        r.register(
            "boot_to_registration_seconds",
            "From the first proxyDHCP answer to a machine until it registered",
            m.boot_to_registration_seconds.clone(),
        );
        r.register(
            "controller_syncs",
            "Kubernetes sync operations by direction (push: inventory to cluster, pull: back) and result",
            m.controller_syncs.clone(),
        );
        r.register(
            "controller_leader",
            "Whether this replica holds its appliance's Lease (1) or not (0)",
            m.controller_leader.clone(),
        );
        r.register(
            "bmc_operations",
            "BMC operations (status, power, bootdev) by result (ok, or the failure kind)",
            m.bmc_operations.clone(),
        );
        r.register(
            "bmc_operation_seconds",
            "Time of one BMC operation, queueing, retries and confirmation included",
            m.bmc_operation_seconds.clone(),
        );
        r.register(
            "bmc_retries",
            "BMC steps tried again, by the reason of the failure before",
            m.bmc_retries.clone(),
        );
        r.register(
            "provisioning_steps",
            "Steps of a server's cluster life (claim, config_served, installed, release, wiped) by result",
            m.provisioning_steps.clone(),
        );
        r.register(
            "capi_reconciles",
            "Cluster API reconciles (MetalCluster, MetalMachine) by kind and result (ok, waiting, or the failure reason)",
            m.capi_reconciles.clone(),
        );
        registry.register(
            "http_tls_failures",
            "HTTPS connections that failed their TLS handshake",
            m.http_tls_failures.clone(),
        );
        registry.register(
            "limited",
            "Requests and connections refused by an abuse limit, by edge and limit (connections, per_source_connections, idle, body_time, boot_rate, registration_rate, unaccepted)",
            m.limited.clone(),
        );
        let m = Metrics { registry, ..m };
        m.zero_series();
        m
    }

    /// Series an alert or the dashboard reads, present at 0 from the start: a counter
    /// that first appears at 1 has no increase to alert on, and an absent series reads
    /// as "no data" rather than "none".
    fn zero_series(&self) {
        let families: [(&Family<Labels, Counter>, &'static str, &[&'static str]); 7] = [
            (
                &self.identity_alarms,
                "kind",
                &[
                    crate::inventory::AlarmKind::SecondRequester.name(),
                    crate::inventory::AlarmKind::SecretReplayed.name(),
                ],
            ),
            (&self.configdata, "result", &["served", "forbidden"]),
            (&self.registrations, "result", &["created", "unauthorized"]),
            (&self.tftp_transfers, "outcome", &["complete", "timeout"]),
            (&self.tftp_errors, "kind", &["truncated"]),
            (
                &self.boot_decisions,
                "action",
                &["discover", "environment", "local-disk", "wipe", "deny"],
            ),
            (&self.dhcp_requests, "result", &["answered"]),
        ];
        for (family, key, values) in families {
            for v in values {
                let _ = family.get_or_create(&[(key, *v)]);
            }
        }
        for v in ["ok", "refused", "failed"] {
            let _ = self.audit_entries.get_or_create(&[("outcome", v)]);
        }
        for op in ["status", "power", "bootdev"] {
            let _ = self
                .bmc_operations
                .get_or_create(&[("operation", op), ("result", "ok")]);
        }
        for direction in ["push", "pull"] {
            for result in ["ok", "error"] {
                let _ = self
                    .controller_syncs
                    .get_or_create(&[("direction", direction), ("result", result)]);
            }
        }
        for step in ["claim", "config_served", "installed", "release", "wiped"] {
            let _ = self
                .provisioning_steps
                .get_or_create(&[("step", step), ("result", "ok")]);
        }
        for (route, status) in [("boot", "2xx"), ("boot", "5xx"), ("env", "2xx")] {
            let _ = self
                .http_requests
                .get_or_create(&[("route", route), ("status", status)]);
        }
    }

    /// Counts one event in a single-label family.
    pub fn inc(family: &Family<Labels, Counter>, key: &'static str, value: &'static str) {
        family.get_or_create(&[(key, value)]).inc();
    }

    /// Counts an HTTP request.
    pub fn http_request(&self, route: &'static str, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .get_or_create(&[("route", route), ("status", class)])
            .inc();
    }

    /// Counts a refusal by an abuse limit.
    pub fn limit(&self, edge: &'static str, limit: &'static str) {
        self.limited
            .get_or_create(&[("edge", edge), ("limit", limit)])
            .inc();
    }

    /// Counts a plugin call and its time.
    pub fn plugin_call(&self, plugin: &str, result: &'static str, took: std::time::Duration) {
        self.plugin_calls
            .get_or_create(&[
                ("plugin", plugin.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
        self.plugin_call_seconds
            .get_or_create(&[("plugin", plugin.to_string())])
            .observe(took.as_secs_f64());
    }

    /// Counts a plugin load.
    pub fn plugin_load(&self, plugin: &str, result: &'static str) {
        self.plugin_loads
            .get_or_create(&[
                ("plugin", plugin.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric registered in `Metrics::new`, as it is exported (a family with no
    /// series yet is not rendered, so they are read from this file).
    fn registered_names() -> Vec<String> {
        let source = include_str!("metrics.rs");
        let fields = &source[..source.find("impl std::fmt::Debug for Metrics").unwrap()];
        source
            .split(".register(")
            .skip(1)
            .filter_map(|call| {
                let name = call.split('"').nth(1)?;
                let field = call.split("m.").nth(1)?.split(".clone()").next()?;
                let kind = fields
                    .split(&format!("pub {field}: "))
                    .nth(1)?
                    .split('\n')
                    .next()?;
                Some(if kind.contains("Counter") {
                    format!("arges_{name}_total")
                } else {
                    format!("arges_{name}")
                })
            })
            .collect()
    }

    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        let names = registered_names();
        let rendered = Metrics::new().render();
        assert!(names.len() >= 30, "{names:?}");
        for name in &names {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md does not list {name}"
            );
        }
        // The names read from the source are the exported ones.
        for name in [
            "arges_http_requests_total",
            "arges_plugins_active",
            "arges_boot_script_seconds",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
            assert!(rendered.contains(name), "{name} exported");
        }
    }

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new();
        Metrics::inc(&m.tftp_errors, "kind", "truncated");
        m.http_request("boot", 200);
        let text = m.render();
        assert!(
            text.contains("arges_tftp_errors_total{kind=\"truncated\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("arges_http_requests_total{route=\"boot\",status=\"2xx\"} 1"),
            "{text}"
        );
    }
}
