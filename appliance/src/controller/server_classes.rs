//! ServerClasses: which Servers belong to a class, and how many are free.
//!
//! A Server is in a class when it meets *every* hardware qualifier *and* the label
//! selector (all of `matchLabels`, all of `matchExpressions`). Peers have OR-ed selectors
//! here, which silently hands out the wrong machines; [`matches()`] is the one definition,
//! used for the status counts now and for claiming servers by class later.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::resources::{Server, ServerClass, ServerClassSpec};

/// Two LISTs per period, by the leader only: cheap even for thousands of servers.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

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

/// Keeps every ServerClass's status counts current, until `cancel` fires (leader only).
pub async fn refresh(ctx: Arc<Context>, cancel: CancellationToken) {
    let classes: Api<ServerClass> = Api::all(ctx.client.clone());
    let servers: Api<Server> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (all_classes, all_servers) = match (
            classes.list(&ListParams::default()).await,
            servers.list(&ListParams::default()).await,
        ) {
            (Ok(c), Ok(s)) => (c, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "cannot list ServerClasses or Servers; retrying");
                continue;
            }
        };
        for class in &all_classes {
            let members: Vec<&Server> = all_servers
                .iter()
                .filter(|s| matches(&class.spec, s))
                .collect();
            let status = json!({"status": {
                "available": members.iter().filter(|s| available(s)).count(),
                "inUse": members.iter().filter(|s| s.status.as_ref().is_some_and(|st| st.in_use)).count(),
                "servers": members.iter().map(|s| s.name_any()).collect::<Vec<_>>(),
            }});
            if class.status.as_ref().map(|s| json!({"status": {"available": s.available, "inUse": s.in_use, "servers": s.servers}})) == Some(status.clone()) {
                continue;
            }
            // Every appliance computes the same counts from the same cluster: a merge
            // patch lets them agree without fighting over field ownership.
            if let Err(e) = classes
                .patch_status(
                    &class.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await
            {
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
