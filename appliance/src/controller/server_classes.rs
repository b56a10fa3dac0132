//! ServerClasses: which Servers belong to a class, and how many are free.
//!
//! A Server is in a class when it meets *every* hardware qualifier *and* the label
//! selector (all of `matchLabels`, all of `matchExpressions`). Peers have OR-ed selectors
//! here, which silently hands out the wrong machines; [`matches()`] is the one definition,
//! used for the status counts and for claiming servers by class. Counts come from watches
//! (no polling): [`watch`] feeds the ServerClass cache, [`count`] recounts on change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::caches::{FreeServers, Racks};
use super::resources::{
    APPLIANCE_LABEL, CONTROL_PLANE_RACK_LABEL, Server, ServerClass, ServerClassSpec,
    ServerClassStatus, ServerCpu, ServerDisk, ServerHardware, ServerSpec, ServerStatus,
};

/// A burst of changes (a rack registering) is one recount, this long after the first.
const DEBOUNCE: Duration = Duration::from_secs(1);
/// A recount without a change, for a status write that was lost: minutes, not seconds.
const RECOUNT_EVERY: Duration = Duration::from_secs(300);

/// Whether `labels` satisfy `selector` (every term of it). An empty selector matches all.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        let value = labels.get(&r.key);
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An operator we do not know matches nothing: never hand out a machine on a
            // selector we could not read.
            _ => false,
        }
    });
    by_label && by_expression
}

/// Whether `server` is in the class `class`.
pub fn matches(class: &ServerClassSpec, server: &Server) -> bool {
    let q = &class.qualifiers;
    let h = &server.spec.hardware;
    (q.vendors.is_empty() || q.vendors.contains(&h.vendor))
        && (q.products.is_empty() || q.products.contains(&h.product))
        && q.min_cpus.is_none_or(|n| h.cpu.count >= n)
        && q.min_memory_bytes.is_none_or(|n| h.memory_bytes >= n)
        && q.min_disks.is_none_or(|n| h.disks.len() as u32 >= n)
        && class
            .selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, server.labels()))
}

/// Whether `server` may be given to a new machine now.
pub fn available(server: &Server) -> bool {
    let status = server.status.clone().unwrap_or_default();
    server.spec.accepted
        && !server.spec.cordoned
        && !status.in_use
        // Never used counts as clean.
        && status.clean.unwrap_or(true)
}

/// Feeds the ServerClass cache (every replica, until `cancel` fires) and signals each
/// change to the class-count task.
pub async fn watch(ctx: Arc<Context>, writer: Writer<ServerClass>, cancel: CancellationToken) {
    let api: Api<ServerClass> = Api::all(ctx.client.clone());
    let mut stream = kube::runtime::reflector(
        writer,
        super::watch_until(api, watcher::Config::default(), cancel),
    )
    .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => ctx.caches.classes_changed.notify_one(),
            Err(e) => tracing::warn!(error = %e, "ServerClass watch failed; retrying"),
        }
    }
}

/// What counting needs of a Server: the fields [`matches()`] and [`available()`] read,
/// and no more, so each Server in the fleet costs the counting appliance a few hundred
/// bytes (its labels, vendor and product strings, and one entry per disk).
fn counted(s: &Server) -> Server {
    let h = &s.spec.hardware;
    let status = s.status.as_ref();
    let mut kept = Server::new(
        &s.name_any(),
        ServerSpec {
            hardware: ServerHardware {
                vendor: h.vendor.clone(),
                product: h.product.clone(),
                cpu: ServerCpu {
                    count: h.cpu.count,
                    model: String::new(),
                },
                memory_bytes: h.memory_bytes,
                disks: vec![ServerDisk::default(); h.disks.len()],
                ..ServerHardware::default()
            },
            accepted: s.spec.accepted,
            cordoned: s.spec.cordoned,
            ..ServerSpec::default()
        },
    );
    // The labels serve the class selectors, and the racks (failure domains).
    kept.metadata.labels = s.metadata.labels.clone();
    kept.status = Some(ServerStatus {
        in_use: status.is_some_and(|st| st.in_use),
        clean: status.and_then(|st| st.clean),
        ..ServerStatus::default()
    });
    kept
}

/// The racks that hold accepted, uncordoned servers (in use or not, so a rack does not
/// come and go as machines claim its servers), each eligible for control-plane machines
/// unless its servers say otherwise.
fn racks(servers: &BTreeMap<String, Server>) -> Racks {
    let mut racks = Racks::new();
    for s in servers
        .values()
        .filter(|s| s.spec.accepted && !s.spec.cordoned)
    {
        let Some(rack) = s.labels().get(APPLIANCE_LABEL) else {
            continue;
        };
        let eligible =
            s.labels().get(CONTROL_PLANE_RACK_LABEL).map(String::as_str) != Some("false");
        let e = racks.entry(rack.clone()).or_insert(true);
        *e = *e && eligible;
    }
    racks
}

/// The free servers of each class, by rack: where a MetalMachine of the class may be
/// placed.
fn free_servers(classes: &[Arc<ServerClass>], servers: &BTreeMap<String, Server>) -> FreeServers {
    classes
        .iter()
        .map(|class| {
            let mut by_rack = BTreeMap::new();
            for s in servers
                .values()
                .filter(|s| matches(&class.spec, s) && available(s))
            {
                if let Some(rack) = s.labels().get(APPLIANCE_LABEL) {
                    *by_rack.entry(rack.clone()).or_insert(0) += 1;
                }
            }
            (class.name_any(), by_rack)
        })
        .collect()
}

/// The status counts of `class` over `servers`.
fn class_status(class: &ServerClassSpec, servers: &BTreeMap<String, Server>) -> ServerClassStatus {
    let members: Vec<&Server> = servers.values().filter(|s| matches(class, s)).collect();
    ServerClassStatus {
        available: members.iter().filter(|s| available(s)).count() as u32,
        in_use: members
            .iter()
            .filter(|s| s.status.as_ref().is_some_and(|st| st.in_use))
            .count() as u32,
        servers: members.iter().map(|s| s.name_any()).collect(),
    }
}

/// Keeps every ServerClass's status counts current, until `cancel` fires (leader only).
/// Every Server of the fleet is watched (kept as [`counted()`] projections); a change to
/// a Server or a class recounts after [`DEBOUNCE`], and a class is written only when its
/// counts differ from what the cache shows, so the appliances that share a cluster agree
/// without writing the same counts over and over. No LIST at steady state.
pub async fn count(ctx: Arc<Context>, cancel: CancellationToken) {
    // A view from an earlier term is stale: unknown until this term's watch has listed.
    ctx.caches.racks.send_replace(None);
    ctx.caches.free.send_replace(None);
    let api: Api<Server> = Api::all(ctx.client.clone());
    let mut stream = super::watch_until(api, watcher::Config::default(), cancel.clone());
    let mut servers: BTreeMap<String, Server> = BTreeMap::new();
    let mut listing: BTreeMap<String, Server> = BTreeMap::new();
    let mut listed = false;
    let mut due: Option<tokio::time::Instant> = None;
    let mut recount = tokio::time::interval(RECOUNT_EVERY);
    loop {
        let wait = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let changed = tokio::select! {
            _ = cancel.cancelled() => return,
            event = stream.next() => match event {
                None => return,
                Some(Ok(watcher::Event::Apply(s))) => {
                    servers.insert(s.name_any(), counted(&s));
                    true
                }
                Some(Ok(watcher::Event::Delete(s))) => {
                    servers.remove(&s.name_any());
                    true
                }
                Some(Ok(watcher::Event::Init)) => {
                    listing.clear();
                    false
                }
                Some(Ok(watcher::Event::InitApply(s))) => {
                    listing.insert(s.name_any(), counted(&s));
                    false
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    servers = std::mem::take(&mut listing);
                    listed = true;
                    true
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Server watch (class counts) failed; retrying");
                    false
                }
            },
            _ = ctx.caches.classes_changed.notified() => true,
            _ = recount.tick() => true,
            _ = wait => {
                due = None;
                if listed {
                    let now = Some(racks(&servers));
                    ctx.caches.racks.send_if_modified(|r| {
                        let changed = *r != now;
                        *r = now;
                        changed
                    });
                    let free = free_servers(&ctx.caches.classes.state(), &servers);
                    ctx.caches.free.send_replace(Some(Arc::new(free)));
                    write_counts(&ctx, &servers).await;
                }
                false
            }
        };
        if changed && due.is_none() {
            due = Some(tokio::time::Instant::now() + DEBOUNCE);
        }
    }
}

/// Writes the counts of every class whose cached status differs.
async fn write_counts(ctx: &Context, servers: &BTreeMap<String, Server>) {
    if ctx.caches.classes.wait_until_ready().await.is_err() {
        return;
    }
    let classes: Api<ServerClass> = Api::all(ctx.client.clone());
    for class in ctx.caches.classes.state() {
        let status = class_status(&class.spec, servers);
        if class.status.as_ref() == Some(&status) {
            continue;
        }
        // Every appliance computes the same counts from the same cluster: a merge
        // patch lets them agree without fighting over field ownership.
        let patch = json!({"status": status});
        match classes
            .patch_status(
                &class.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                ctx.metrics()
                    .controller_syncs
                    .get_or_create(&[("direction", "class_counts"), ("result", "ok")])
                    .inc();
            }
            Err(e) => {
                ctx.metrics()
                    .controller_syncs
                    .get_or_create(&[("direction", "class_counts"), ("result", "error")])
                    .inc();
                tracing::warn!(class = %class.name_any(), error = %e, "cannot update the ServerClass status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::resources::{Qualifiers, ServerHardware, ServerSpec, ServerStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn server(vendor: &str, cpus: u32, labels: &[(&str, &str)]) -> Server {
        let mut s = Server::new(
            "s",
            ServerSpec {
                uuid: "u".into(),
                hardware: ServerHardware {
                    vendor: vendor.into(),
                    cpu: crate::controller::resources::ServerCpu {
                        count: cpus,
                        model: String::new(),
                    },
                    ..ServerHardware::default()
                },
                accepted: true,
                ..ServerSpec::default()
            },
        );
        s.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s
    }

    fn selector(labels: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: Some(
                exprs
                    .iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: k.to_string(),
                        operator: op.to_string(),
                        values: Some(vs.iter().map(|v| v.to_string()).collect()),
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn qualifiers_and_selector_are_anded() {
        let class = ServerClassSpec {
            qualifiers: Qualifiers {
                vendors: vec!["Dell Inc.".into()],
                min_cpus: Some(16),
                ..Qualifiers::default()
            },
            selector: Some(selector(
                &[("rack", "a")],
                &[("role", "In", &["storage", "db"])],
            )),
            environment_ref: None,
        };
        let all = [("rack", "a"), ("role", "db")];
        assert!(matches(&class, &server("Dell Inc.", 32, &all)));
        // Any one term failing excludes the server: never OR.
        assert!(!matches(&class, &server("HPE", 32, &all)), "vendor");
        assert!(!matches(&class, &server("Dell Inc.", 8, &all)), "cpus");
        assert!(
            !matches(&class, &server("Dell Inc.", 32, &[("role", "db")])),
            "matchLabels"
        );
        assert!(
            !matches(&class, &server("Dell Inc.", 32, &[("rack", "a")])),
            "matchExpressions"
        );
        assert!(!matches(
            &class,
            &server("Dell Inc.", 32, &[("rack", "a"), ("role", "web")])
        ));
    }

    #[test]
    fn expression_operators() {
        let labels: BTreeMap<String, String> = [("zone".to_string(), "z1".to_string())].into();
        for (op, values, want) in [
            ("In", &["z1", "z2"][..], true),
            ("In", &["z3"][..], false),
            ("NotIn", &["z3"][..], true),
            ("NotIn", &["z1"][..], false),
            ("Exists", &[][..], true),
            ("DoesNotExist", &[][..], false),
            ("Gt", &["1"][..], false),
        ] {
            let s = selector(&[], &[("zone", op, values)]);
            assert_eq!(selector_matches(&s, &labels), want, "{op} {values:?}");
        }
        let absent = selector(&[], &[("gpu", "DoesNotExist", &[])]);
        assert!(selector_matches(&absent, &labels));
        assert!(
            selector_matches(&LabelSelector::default(), &labels),
            "empty matches all"
        );
    }

    #[test]
    fn counts_come_from_projections_that_keep_what_matching_reads() {
        let mut big = server("Dell Inc.", 32, &[("rack", "a")]);
        big.spec.hardware.memory_bytes = 64 << 30;
        big.spec.hardware.disks = vec![ServerDisk::default(), ServerDisk::default()];
        big.spec.hardware.cpu.model = "a long model name".into();
        let mut used = server("Dell Inc.", 32, &[("rack", "a")]);
        used.metadata.name = Some("used".into());
        used.status = Some(ServerStatus {
            in_use: true,
            ..ServerStatus::default()
        });
        let other = server("HPE", 64, &[("rack", "a")]);
        let class = ServerClassSpec {
            qualifiers: Qualifiers {
                vendors: vec!["Dell Inc.".into()],
                min_disks: Some(2),
                min_memory_bytes: Some(32 << 30),
                ..Qualifiers::default()
            },
            selector: Some(selector(&[("rack", "a")], &[])),
            environment_ref: None,
        };
        for s in [&big, &used, &other] {
            let p = counted(s);
            assert_eq!(matches(&class, &p), matches(&class, s));
            assert_eq!(available(&p), available(s));
            assert!(
                p.spec.hardware.cpu.model.is_empty(),
                "only what counting reads"
            );
        }
        used.spec.hardware = big.spec.hardware.clone();
        let all: BTreeMap<String, Server> = [(&big, "s"), (&used, "used"), (&other, "o")]
            .into_iter()
            .map(|(s, name)| (name.to_string(), counted(s)))
            .collect();
        assert_eq!(
            class_status(&class, &all),
            ServerClassStatus {
                available: 1,
                in_use: 1,
                servers: vec!["s".into(), "used".into()],
            }
        );
    }

    #[test]
    fn racks_are_where_accepted_uncordoned_servers_are() {
        let in_rack = |rack: &str, cp: Option<&str>, accepted: bool, cordoned: bool| {
            let mut s = server("x", 1, &[(APPLIANCE_LABEL, rack)]);
            if let Some(cp) = cp {
                s.labels_mut()
                    .insert(CONTROL_PLANE_RACK_LABEL.into(), cp.into());
            }
            s.spec.accepted = accepted;
            s.spec.cordoned = cordoned;
            s.status = Some(ServerStatus {
                in_use: true,
                ..ServerStatus::default()
            });
            counted(&s)
        };
        let servers: BTreeMap<String, Server> = [
            in_rack("rack-a", Some("true"), true, false),
            in_rack("rack-b", Some("false"), true, false),
            in_rack("rack-c", None, false, false),
            in_rack("rack-d", None, true, true),
            in_rack("rack-e", None, true, false),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, s)| (i.to_string(), s))
        .collect();
        let r = racks(&servers);
        assert_eq!(
            r,
            Racks::from([
                ("rack-a".into(), true),
                ("rack-b".into(), false),
                ("rack-e".into(), true),
            ]),
            "in use counts; unaccepted and cordoned do not"
        );
    }

    #[test]
    fn free_servers_are_counted_by_class_and_rack() {
        let in_rack = |rack: &str, vendor: &str, in_use: bool| {
            let mut s = server(vendor, 1, &[(APPLIANCE_LABEL, rack)]);
            s.status = Some(ServerStatus {
                in_use,
                ..ServerStatus::default()
            });
            counted(&s)
        };
        let servers: BTreeMap<String, Server> = [
            in_rack("rack-a", "QEMU", false),
            in_rack("rack-a", "QEMU", false),
            in_rack("rack-a", "QEMU", true),
            in_rack("rack-b", "QEMU", true),
            in_rack("rack-b", "Dell", false),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, s)| (i.to_string(), s))
        .collect();
        let class = |name: &str, vendor: &str| {
            let mut spec = ServerClassSpec::default();
            spec.qualifiers.vendors = vec![vendor.into()];
            Arc::new(ServerClass::new(name, spec))
        };
        let free = free_servers(&[class("qemu", "QEMU"), class("hp", "HP")], &servers);
        assert_eq!(
            free,
            FreeServers::from([
                ("qemu".into(), BTreeMap::from([("rack-a".into(), 2)])),
                ("hp".into(), BTreeMap::new()),
            ]),
            "servers in use and of other classes are not free for the class"
        );
    }

    #[test]
    fn availability() {
        let mut s = server("x", 1, &[]);
        assert!(available(&s), "accepted and never used");
        s.status = Some(ServerStatus {
            in_use: true,
            ..ServerStatus::default()
        });
        assert!(!available(&s));
        s.status = Some(ServerStatus {
            clean: Some(false),
            ..ServerStatus::default()
        });
        assert!(!available(&s), "not wiped since its last use");
        s.status = None;
        s.spec.cordoned = true;
        assert!(!available(&s));
    }
}
