//! Server sync, both ways.
//!
//! *Push* (leader only): every inventory change becomes a server-side apply of the fields
//! the appliance owns: the Server's identity, hardware and appliance label, and its
//! status. Changes are queued by id and flushed within a quarter second; a failed push
//! stays queued, so registrations made while the control plane is down reach it once it
//! is back. A Server the apiserver refuses waits alone with its own backoff: it never
//! holds up the others. A full resync runs at start, after a lagged event stream, and
//! periodically; it sends only the Servers whose patches differ from their last push that
//! went through (or that the cache does not show), so a steady fleet costs nothing.
//!
//! *Pull* (every replica): a watch on the Servers labelled with this appliance's identity
//! feeds what operators set with kubectl (`accepted`, `cordoned`, `environmentRef`,
//! labels) into the local inventory through the core, so the boot path decides from the
//! local copy and keeps serving while the control plane is away. The watcher re-lists
//! after expiry and backs off while the apiserver is unreachable. The same watch feeds
//! the cache of this appliance's Servers that claims pick from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::resources::{APPLIANCE_LABEL, CONTROL_PLANE_RACK_LABEL, Server as ServerResource};
use crate::bmc::PowerFailure;
use crate::core::{DesiredState, ServerEvent};
use crate::inventory::Server;
use crate::timeline::Boot;

/// Annotation holding the inventory id when it differs from the Server's name.
pub const ID_ANNOTATION: &str = "metal.arges.dev/inventory-id";
/// Changes are pushed this soon: a burst (a rack registering) still goes out together,
/// and a registration is a Server within a fraction of a second.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// Longest pause before a refused Server is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The Kubernetes name of an inventory id: duplicate-UUID ids (`<uuid>-<mac>`) lose
/// their colons.
pub fn resource_name(id: &str) -> String {
    id.replace(':', "").to_ascii_lowercase()
}

fn rfc3339(unix: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The apply patch of the spec and metadata the appliance owns: its rack (identity and
/// control-plane eligibility) as labels, so classes and failure domains can use them.
fn spec_patch(s: &Server, ctx: &Context) -> serde_json::Value {
    let h = &s.hardware;
    json!({
        "apiVersion": "metal.arges.dev/v1alpha1",
        "kind": "Server",
        "metadata": {
            "name": resource_name(&s.id),
            "labels": {
                APPLIANCE_LABEL: ctx.identity,
                CONTROL_PLANE_RACK_LABEL: ctx.control_plane.to_string(),
            },
            "annotations": { ID_ANNOTATION: s.id },
        },
        "spec": {
            "uuid": s.uuid,
            "hardware": {
                "vendor": h.vendor,
                "product": h.product,
                "serial": h.serial,
                "cpu": { "count": h.cpu.count, "model": h.cpu.model },
                "memoryBytes": h.memory_bytes,
                "nics": h.nics.iter().map(|n| json!({"name": n.name, "mac": n.mac, "addresses": n.addresses})).collect::<Vec<_>>(),
                "disks": h.disks.iter().map(|d| json!({"name": d.name, "sizeBytes": d.size_bytes, "model": d.model, "serial": d.serial, "rotational": d.rotational})).collect::<Vec<_>>(),
            },
        },
    })
}

/// The machine's addresses as Cluster API writes them: every NIC address from its last
/// registration, less link-local and loopback ones.
pub fn addresses(s: &Server) -> Vec<serde_json::Value> {
    s.hardware
        .nics
        .iter()
        .flat_map(|n| n.addresses.iter())
        .filter_map(|a| a.split('/').next())
        .filter(|a| !a.starts_with("fe80") && !a.starts_with("127."))
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect()
}

/// The apply patch of the status the appliance observes.
fn status_patch(s: &Server, identity: &str, witnessed: Option<&Boot>) -> serde_json::Value {
    let addresses = addresses(s);
    let witnessed = witnessed.map(|b| {
        json!({
            "started": rfc3339(b.started_ms / 1000),
            "steps": b.steps.len() as u64 + u64::from(b.dropped),
            "lastStep": b.last_step().map(|w| w.step.summary()).unwrap_or_default(),
            "millis": b.duration_ms(),
        })
    });
    let last_boot = s.boot_history.back().map(|b| {
        json!({"time": rfc3339(b.at), "action": b.action, "environment": b.environment, "witnessed": witnessed})
    });
    let registered = json!({
        "type": "Registered",
        "status": "True",
        "reason": if s.uuid_conflict { "DuplicateUUID" } else { "AgentRegistered" },
        "message": if s.uuid_conflict {
            "another machine reports the same SMBIOS UUID; identified by UUID and MAC"
        } else {
            "the discovery agent registered this machine"
        },
        "lastTransitionTime": rfc3339(s.registered_at),
    });
    let (power, state) = power_status(s);
    let mut conditions = vec![registered];
    conditions.extend(power);
    let now = crate::inventory::now();
    let window = s.window.as_ref().map(|w| {
        json!({
            "id": w.id,
            "state": w.state(now),
            "openedAt": rfc3339(w.opened_at),
            "expiresAt": rfc3339(w.expires_at),
            "openedBy": w.opened_by,
            "claimant": w.claimant.as_ref().map(|c| json!({"address": c.source.to_string(), "mac": c.mac})),
            "issued": w.issued.map(|k| k.name()),
        })
    });
    let alarm = s.alarm.as_ref().map(|a| {
        json!({
            "time": rfc3339(a.at),
            "reason": a.kind.reason(),
            "message": a.message,
            "first": a.first.as_ref().map(|r| r.source.to_string()),
            "second": a.second.source.to_string(),
        })
    });
    match (&s.alarm, &s.window) {
        (Some(a), _) => conditions.push(json!({
            "type": "ProvisioningWindow",
            "status": "False",
            "reason": a.kind.reason(),
            "message": format!("{}; no secret goes out until the Server is armed again (spec.arm)", a.message),
            "lastTransitionTime": rfc3339(a.at),
        })),
        (None, Some(w)) => conditions.push(json!({
            "type": "ProvisioningWindow",
            "status": if w.is_open(now) { "True" } else { "False" },
            "reason": camel(&w.state(now).replace('-', "_")),
            "message": format!("window {} opened by {}", w.id, w.opened_by),
            "lastTransitionTime": rfc3339(w.closed.as_ref().map_or(w.opened_at, |c| c.at)),
        })),
        (None, None) => {}
    }
    if let Some(r) = s.refusals.back() {
        conditions.push(json!({
            "type": "RegistrationRefused",
            "status": "True",
            "reason": "Refused",
            "message": format!("from {}: {}", r.source, r.reason),
            "lastTransitionTime": rfc3339(r.at),
        }));
    }
    let mut patch = json!({
        "apiVersion": "metal.arges.dev/v1alpha1",
        "kind": "Server",
        "status": {
            "appliance": identity,
            "addresses": addresses,
            "lastBoot": last_boot,
            "power": state,
            "clean": !s.provisioning.dirty,
            "phase": s.phase(),
            "conditions": conditions,
        },
    });
    // Left out when absent: server-side apply then drops what this manager set before.
    for (key, value) in [("window", window), ("alarm", alarm)] {
        if let Some(v) = value {
            patch["status"][key] = v;
        }
    }
    patch
}

/// Server `id` as an event's subject.
fn server_ref(id: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("metal.arges.dev/v1alpha1".into()),
        kind: Some("Server".into()),
        name: Some(resource_name(id)),
        ..Default::default()
    }
}

/// A BMC operation's end as an event on the Server: Normal when it worked, Warning with
/// the reason when not.
async fn power_event(ctx: &Context, id: &str, e: &crate::inventory::PowerEvent) {
    let to = server_ref(id);
    let reason = if e.ok {
        "PowerOperationSucceeded".to_string()
    } else {
        format!(
            "PowerOperationFailed{}",
            camel(e.reason.map_or("unknown", PowerFailure::as_str))
        )
    };
    let note = match &e.message {
        Some(m) => format!("{}: {m}", e.operation),
        None => format!(
            "{} done by driver {} in {} ms",
            e.operation,
            e.driver.as_deref().unwrap_or("?"),
            e.took_ms
        ),
    };
    ctx.publish(&to, !e.ok, &reason, "Power", &note).await;
}

/// A tripped window or a replayed secret as a Warning event on the Server.
async fn alarm_event(ctx: &Context, id: &str, alarm: &crate::inventory::Alarm) {
    let to = server_ref(id);
    ctx.publish(
        &to,
        true,
        alarm.kind.reason(),
        "ProvisioningWindow",
        &format!(
            "{}; arm the Server again (spec.arm) once the real machine is known",
            alarm.message
        ),
    )
    .await;
}

/// `not_settled` → `NotSettled`.
fn camel(kind: &str) -> String {
    kind.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The `PowerControl` condition and the power fields of the status.
fn power_status(s: &Server) -> (Option<serde_json::Value>, Option<String>) {
    let state = s.power.state.map(|p| match p {
        crate::bmc::PowerState::On => "on".to_string(),
        crate::bmc::PowerState::Off => "off".to_string(),
    });
    let condition = s.power.history.back().map(|e| {
        json!({
            "type": "PowerControl",
            "status": if e.ok { "True" } else { "False" },
            "reason": if e.ok { "Succeeded".to_string() } else { camel(e.reason.map_or("unknown", PowerFailure::as_str)) },
            "message": e.message.clone().unwrap_or_else(|| format!("{} by driver {}", e.operation, e.driver.as_deref().unwrap_or("?"))),
            "lastTransitionTime": rfc3339(e.at),
        })
    });
    (condition, state)
}

/// One server's spec and status patches, and a digest of both: a push whose digest
/// matches the last one that went through (and whose Server the cache shows) is skipped.
fn patches(s: &Server, ctx: &Context) -> (serde_json::Value, serde_json::Value, [u8; 32]) {
    use sha2::{Digest, Sha256};
    let witnessed = ctx.core.timeline().last_boot(&s.macs);
    let (spec, status) = (
        spec_patch(s, ctx),
        status_patch(s, &ctx.identity, witnessed.as_ref()),
    );
    let mut h = Sha256::new();
    h.update(spec.to_string());
    h.update(status.to_string());
    (spec, status, h.finalize().into())
}

/// Pushes one server's spec and status.
async fn push_one(
    api: &Api<ServerResource>,
    name: &str,
    spec: serde_json::Value,
    status: serde_json::Value,
    ctx: &Context,
) -> kube::Result<()> {
    let pp = PatchParams::apply(&ctx.field_manager).force();
    api.patch(name, &pp, &Patch::Apply(spec)).await?;
    api.patch_status(name, &pp, &Patch::Apply(status)).await?;
    Ok(())
}

/// Inventory → cluster, until `cancel` fires (leadership lost or shutdown).
pub async fn push(ctx: Arc<Context>, cancel: CancellationToken) {
    let api: Api<ServerResource> = Api::all(ctx.client.clone());
    let mut events = ctx.core.subscribe();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    // Servers the apiserver refused: attempts, and when to try again.
    let mut held: BTreeMap<String, (u32, tokio::time::Instant)> = BTreeMap::new();
    // The digest of each Server's last push that went through: a resync sends only what
    // changed, so at steady state it costs no request whatever the number of servers.
    let mut pushed: BTreeMap<String, [u8; 32]> = BTreeMap::new();
    let mut resync = true;
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut full = tokio::time::interval(RESYNC_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            e = events.recv() => match e {
                Ok(ServerEvent::Changed(id)) => { dirty.insert(id); }
                // Deletions come from the cluster (pull), which already has them.
                Ok(ServerEvent::Deleted(id)) => { dirty.remove(&id); pushed.remove(&id); }
                Ok(ServerEvent::Power(id, event)) => {
                    power_event(&ctx, &id, &event).await;
                    dirty.insert(id);
                }
                Ok(ServerEvent::Alarm(id, alarm)) => {
                    alarm_event(&ctx, &id, &alarm).await;
                    dirty.insert(id);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "inventory events lagged; resynchronising");
                    resync = true;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = full.tick() => resync = true,
            _ = flush.tick() => {
                if resync {
                    match ctx.core.servers().await {
                        Ok(all) => {
                            dirty.extend(all.into_iter().map(|s| s.id));
                            resync = false;
                        }
                        Err(e) => tracing::error!(error = %e, "cannot read the inventory to resynchronise"),
                    }
                }
                let now = tokio::time::Instant::now();
                let ids: Vec<String> = dirty
                    .iter()
                    .filter(|id| held.get(*id).is_none_or(|(_, until)| *until <= now))
                    .cloned()
                    .collect();
                for id in ids {
                    let s = match ctx.core.server(&id).await {
                        Ok(s) => s,
                        Err(_) => { dirty.remove(&id); held.remove(&id); pushed.remove(&id); continue; }
                    };
                    let name = resource_name(&s.id);
                    let (spec, status, digest) = patches(&s, &ctx);
                    let cached = ctx.caches.servers.get(&kube::runtime::reflector::ObjectRef::new(&name)).is_some();
                    if cached && pushed.get(&id) == Some(&digest) {
                        dirty.remove(&id);
                        continue;
                    }
                    match push_one(&api, &name, spec, status, &ctx).await {
                        Ok(()) => {
                            dirty.remove(&id);
                            pushed.insert(id.clone(), digest);
                            if held.remove(&id).is_some() {
                                tracing::info!(server = %id, "the Server is updated again");
                            }
                            ctx.metrics().controller_syncs.get_or_create(&[("direction", "push"), ("result", "ok")]).inc();
                        }
                        Err(e) if refused_object(&e) => {
                            // The apiserver refuses this object: it waits alone, with
                            // its own backoff, and every other Server goes on.
                            ctx.metrics().controller_syncs.get_or_create(&[("direction", "push"), ("result", "refused")]).inc();
                            let tries = held.get(&id).map_or(0, |(n, _)| *n) + 1;
                            let wait = (FLUSH_EVERY * 2u32.saturating_pow(tries.min(8))).min(MAX_BACKOFF);
                            if tries == 1 {
                                tracing::warn!(server = %id, error = %e, retry_in = ?wait, "the apiserver refuses this Server's update; the others go on");
                                let note = format!("the apiserver refuses this appliance's update of the Server (retried alone, with backoff): {e}");
                                // Not awaited here: a refusal of every Server (an RBAC
                                // change) must not hold the others' sync up.
                                let (ctx, to) = (Arc::clone(&ctx), server_ref(&id));
                                tokio::spawn(async move { ctx.publish(&to, true, "SyncRefused", "Sync", &note).await });
                            }
                            held.insert(id, (tries, now + wait));
                        }
                        Err(e) => {
                            ctx.metrics().controller_syncs.get_or_create(&[("direction", "push"), ("result", "error")]).inc();
                            tracing::warn!(server = %id, error = %e, queued = dirty.len(), "cannot update the Server; will retry");
                            // The apiserver is likely down: keep the rest queued too.
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Whether the apiserver refused this one object (invalid, forbidden, in conflict),
/// rather than being unreachable or overloaded.
fn refused_object(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 429)
}

/// What a Server resource asks of the inventory.
fn desired(s: &ServerResource) -> DesiredState {
    let labels: BTreeMap<String, String> = s
        .labels()
        .iter()
        .filter(|(k, _)| k.as_str() != APPLIANCE_LABEL && k.as_str() != CONTROL_PLANE_RACK_LABEL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    DesiredState {
        accepted: s.spec.accepted,
        cordoned: s.spec.cordoned,
        environment: s.spec.environment_ref.as_ref().map(|r| r.name.clone()),
        labels,
        arm: s.spec.arm.clone(),
        changed_by: spec_manager(s),
    }
}

/// The field manager that changed the Server's spec or labels last (`kubectl-patch`,
/// `kubectl-label`, a controller's name), as `manager=NAME`; none when that was an
/// appliance (`arges-<identity>`). The apiserver records only the manager, not the user
/// (the user is in the apiserver's own audit log), and anyone may name a manager: the
/// name is cut to a plain charset and marked as a manager's, so it cannot pass for a
/// console user.
fn spec_manager(s: &ServerResource) -> Option<String> {
    let latest = s
        .metadata
        .managed_fields
        .as_deref()?
        .iter()
        .filter(|m| {
            m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec").is_some()
                    || f.0
                        .get("f:metadata")
                        .and_then(|m| m.get("f:labels"))
                        .is_some()
            })
        })
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))?;
    let name = latest.manager.as_deref()?;
    if name.starts_with("arges-") {
        return None;
    }
    let plain: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        .take(64)
        .collect();
    Some(format!("manager={plain}"))
}

/// The inventory id of a Server: its annotation, else its name.
pub fn inventory_id(s: &ServerResource) -> String {
    s.annotations()
        .get(ID_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| s.name_any())
}

async fn pull_one(ctx: &Context, s: &ServerResource) {
    let id = inventory_id(s);
    if s.spec.bmc.as_ref().is_some_and(|b| b.pass.is_some()) {
        ctx.warn_once(
            s,
            "InlineCredentials",
            "spec.bmc.pass holds a password in the Server itself; put it in a Secret (spec.bmc.credentialsSecretRef)",
        )
        .await;
    }
    let applied = match ctx.core.apply_desired(&id, desired(s)).await {
        Ok(_) => apply_bmc(ctx, s, &id).await,
        Err(e) => Err(e),
    };
    match applied {
        Ok(()) => {
            ctx.metrics()
                .controller_syncs
                .get_or_create(&[("direction", "pull"), ("result", "ok")])
                .inc();
        }
        // A Server of ours this appliance has not registered (restored from a backup,
        // say): nothing to apply until the machine registers here.
        Err(crate::core::CoreError::NotFound(_)) => {
            tracing::debug!(server = %id, "Server not in the local inventory");
        }
        Err(e) => {
            ctx.metrics()
                .controller_syncs
                .get_or_create(&[("direction", "pull"), ("result", "error")])
                .inc();
            tracing::warn!(server = %id, error = %e, "cannot apply the Server to the inventory");
        }
    }
}

/// `spec.bmc` to the inventory: the endpoint read as a protocol and address, the
/// credentials from the Secret (or inline), sealed by the core. Unchanged settings are
/// left alone, so a resync does not rewrite the store.
async fn apply_bmc(
    ctx: &Context,
    s: &ServerResource,
    id: &str,
) -> Result<(), crate::core::CoreError> {
    use crate::core::CoreError;
    let Some(b) = &s.spec.bmc else {
        return Ok(());
    };
    let (settings, pass) = match bmc_with_credentials(ctx, b, &ctx.namespace).await {
        Ok(found) => found,
        Err(BmcProblem::Missing(note)) => {
            ctx.warn_once(s, "BMCCredentialsMissing", &note).await;
            return Ok(());
        }
        Err(BmcProblem::Unavailable(note)) => {
            ctx.warn_once(s, "BMCCredentialsUnavailable", &note).await;
            return Err(CoreError::Invalid(note));
        }
        Err(BmcProblem::Invalid(note)) => {
            ctx.warn_once(s, "BMCInvalid", &note).await;
            return Err(CoreError::Invalid(note));
        }
    };
    ctx.core
        .set_bmc_if_changed(id, settings, pass)
        .await
        .map(|_| ())
}

/// Why a `bmc` block cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BmcProblem {
    /// Neither a Secret nor inline credentials.
    Missing(String),
    /// The Secret cannot be read or lacks a key.
    Unavailable(String),
    /// The endpoint or TLS settings are wrong.
    Invalid(String),
}

impl BmcProblem {
    /// A condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            BmcProblem::Missing(_) => "BMCCredentialsMissing",
            BmcProblem::Unavailable(_) => "BMCCredentialsUnavailable",
            BmcProblem::Invalid(_) => "BMCInvalid",
        }
    }

    /// What is wrong, in words.
    pub fn note(&self) -> &str {
        match self {
            BmcProblem::Missing(n) | BmcProblem::Unavailable(n) | BmcProblem::Invalid(n) => n,
        }
    }
}

/// A `bmc` block (of a Server or a MetalMachine) as settings and a password: the
/// credentials from its Secret (in `default_namespace` unless it names one), else inline.
pub async fn bmc_with_credentials(
    ctx: &Context,
    b: &super::resources::Bmc,
    default_namespace: &str,
) -> Result<(crate::bmc::BmcSettings, String), BmcProblem> {
    let (user, pass) = match (&b.credentials_secret_ref, &b.user, &b.pass) {
        (Some(r), _, _) => secret_credentials(ctx, r, default_namespace)
            .await
            .map_err(BmcProblem::Unavailable)?,
        (None, Some(u), Some(p)) => (u.clone(), p.clone()),
        _ => {
            return Err(BmcProblem::Missing(
                "bmc has neither credentialsSecretRef nor user and pass".into(),
            ));
        }
    };
    let settings = bmc_settings(b, user).map_err(BmcProblem::Invalid)?;
    Ok((settings, pass))
}

/// Reads `user` and `pass` (or the named keys) from a Secret.
async fn secret_credentials(
    ctx: &Context,
    r: &super::resources::SecretRef,
    default_namespace: &str,
) -> Result<(String, String), String> {
    let ns = r.namespace.as_deref().unwrap_or(default_namespace);
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = api
        .get(&r.name)
        .await
        .map_err(|e| format!("cannot read Secret {ns}/{}: {e}", r.name))?;
    let data = secret.data.unwrap_or_default();
    let get = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .ok_or_else(|| format!("Secret {ns}/{} has no key {key:?}", r.name))
    };
    Ok((
        get(r.user_key.as_deref().unwrap_or("user"))?,
        get(r.pass_key.as_deref().unwrap_or("pass"))?,
    ))
}

/// `spec.bmc` as the inventory keeps it: `ipmi://`, `redfish://` or `https://` say the
/// protocol, a bare `host[:port]` is IPMI.
fn bmc_settings(
    b: &super::resources::Bmc,
    username: String,
) -> Result<crate::bmc::BmcSettings, String> {
    use crate::bmc::{BmcSettings, Protocol, TlsSettings};
    let e = b.endpoint.trim();
    let (protocol, address) = if let Some(rest) = e.strip_prefix("ipmi://") {
        (Protocol::Ipmi, rest)
    } else if let Some(rest) = e
        .strip_prefix("redfish://")
        .or_else(|| e.strip_prefix("https://"))
    {
        (Protocol::Redfish, rest)
    } else if e.contains("://") {
        return Err(format!(
            "spec.bmc.endpoint {e:?}: use ipmi://, redfish:// or https://"
        ));
    } else {
        (Protocol::Ipmi, e)
    };
    let settings = BmcSettings {
        address: address.trim_end_matches('/').to_string(),
        protocol,
        driver: b.driver.clone(),
        tls: TlsSettings {
            ca_file: b.ca_file.clone().map(Into::into),
            pin_sha256: b.certificate_sha256.clone(),
            insecure: b.insecure_skip_verify,
        },
        username,
    };
    settings.validate()?;
    Ok(settings)
}

/// Cluster → inventory, until `cancel` fires; the same watch feeds the cache of this
/// appliance's Servers (`writer`).
pub async fn pull(
    ctx: Arc<Context>,
    writer: kube::runtime::reflector::store::Writer<ServerResource>,
    cancel: CancellationToken,
) {
    let api: Api<ServerResource> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().labels(&format!("{APPLIANCE_LABEL}={}", ctx.identity));
    let mut stream =
        kube::runtime::reflector(writer, super::watch_until(api, config, cancel)).boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => pull_one(&ctx, &s).await,
            Ok(watcher::Event::Delete(s)) => {
                let id = inventory_id(&s);
                match ctx.core.delete_server(&id).await {
                    Ok(_) => {
                        tracing::info!(server = %id, "Server deleted in the cluster; forgotten")
                    }
                    Err(e) => {
                        tracing::debug!(server = %id, error = %e, "deleted Server not in the inventory")
                    }
                }
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => {
                // The backoff paces the retries; say so once per failure.
                tracing::warn!(error = %e, "Server watch failed; retrying");
                ctx.metrics()
                    .controller_syncs
                    .get_or_create(&[("direction", "pull"), ("result", "watch_error")])
                    .inc();
            }
        }
    }
}
