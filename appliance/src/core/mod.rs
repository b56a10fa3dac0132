//! The core: the one door the protocol edges use.
//!
//! Its operations: decide a boot and render its script (here); register a machine, hand
//! out a configuration and take its done report, open, arm and close provisioning windows
//! ([`identity`], which says who may have which secret); claim, stage, power-mark and
//! release a server for a cluster (`provision.rs`); BMC power and boot device
//! (`power.rs`);
//! and administer the inventory (here). The edges (HTTP and the Kubernetes controller)
//! call only these; the services behind them (inventory, policy, templates, config,
//! sealing, the power manager) are never reached around. Inventory writes are blocking
//! (fsync on commit), so they run on the blocking pool. `testing.rs` is the seam tests
//! drive it through, with no socket and no file (`Core::test()`).

pub mod config;
pub mod identity;
pub mod policy;
mod power;
mod provision;
#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde_json::json;

use crate::audit::{AuditLog, Outcome};
use crate::config::{Config, Environment, LocalDiskMethod};
use crate::inventory::{BootRecord, Inventory, InventoryError, Requester, SecretKind, Server, now};
use crate::ipxe::{ScriptKind, TemplateError};
use crate::metrics::Metrics;
use crate::registration::{NextAction, RegistrationResponse, normalize_mac, normalize_uuid};
use crate::sealing::Sealer;
use crate::timeline::{Boot, Machine as WitnessedMachine, Step, Timeline, Who};
pub use identity::RegistrationProof;
use identity::{Admission, BootSecrets, BootSecretsFor};
pub use policy::{
    BootAction, BootPolicy, Decision, DecisionBy, DefaultPolicy, HardwareSummary, InventoryFacts,
    MachineFacts, PolicyError,
};
pub use power::PowerReport;
pub use provision::ClaimRequest;

/// Failures of core operations; the edges map each to a status or a condition, and
/// never look behind the core at the service that failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The inventory store failed (I/O, an unreadable record).
    #[error(transparent)]
    Store(InventoryError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    /// No credential the appliance knows.
    #[error("{0}")]
    Unauthorized(String),
    /// No such server (or other object the operation names).
    #[error("{0}")]
    NotFound(String),
    /// The server's state forbids this now (held by another machine, not wiped yet).
    #[error("{0}")]
    Conflict(String),
    /// Kubernetes mode: the cluster owns this; change it there.
    #[error("{0}")]
    Managed(String),
    /// A limit holds this back for now (try again later).
    #[error("{0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<InventoryError> for CoreError {
    fn from(e: InventoryError) -> Self {
        match e {
            InventoryError::NotFound(_) => CoreError::NotFound(e.to_string()),
            InventoryError::Conflict(why) => CoreError::Conflict(why),
            InventoryError::Invalid(_) => CoreError::Invalid(e.to_string()),
            InventoryError::Store(_) | InventoryError::Corrupt { .. } => CoreError::Store(e),
        }
    }
}

impl CoreError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CoreError::Store(e) => e.kind(),
            CoreError::Template(_) => "template",
            CoreError::Invalid(_) => "invalid",
            CoreError::Forbidden(_) => "forbidden",
            CoreError::Unauthorized(_) => "unauthorized",
            CoreError::NotFound(_) => "not_found",
            CoreError::Conflict(_) => "conflict",
            CoreError::Managed(_) => "managed",
            CoreError::Busy(_) => "busy",
            CoreError::Internal(_) => "internal",
        }
    }
}

/// Result alias of the core.
pub type Result<T> = std::result::Result<T, CoreError>;

/// What a booting machine said about itself.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub uuid: Option<String>,
    pub mac: Option<String>,
    pub arch: Option<String>,
    pub source: IpAddr,
    /// Base URL the machine reached us at (`http://host:port`), used in scripts.
    pub base_url: String,
}

/// A rendered answer to `/boot.ipxe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootScript {
    /// An iPXE script.
    Script { action: &'static str, body: String },
    /// Answer 404 so the firmware falls through to its next boot device.
    FallThrough,
}

/// The core facade.
pub struct Core {
    config: Arc<Config>,
    inventory: Arc<Inventory>,
    policy: Arc<dyn BootPolicy>,
    fallback: DefaultPolicy,
    metrics: Arc<Metrics>,
    registration_token: String,
    admin_token: String,
    /// Each machine's boots as witnessed, step by step (shared with the TFTP edge).
    timeline: Arc<Timeline>,
    /// Who did what: admin actions, changes from Kubernetes, secrets served, refusals.
    audit: Arc<AuditLog>,
    events: tokio::sync::broadcast::Sender<ServerEvent>,
    /// Environments defined in the cluster (Kubernetes mode), beside the config's.
    cluster_environments: RwLock<Arc<BTreeMap<String, Environment>>>,
    /// Power control: the BMC power manager.
    power: Option<power::PowerControl>,
    /// Seals BMC passwords and configurations at rest.
    sealer: Arc<Sealer>,
    /// Registration secrets handed to boots outside any window.
    boot_secrets: BootSecrets,
    /// When proxyDHCP last answered each MAC (unix seconds).
    dhcp_seen: Mutex<HashMap<String, u64>>,
    /// Where agents register over HTTPS (its port) and the certificate they pin.
    agent_tls: std::sync::OnceLock<(u16, String)>,
    /// Kubernetes mode: who a console credential other than the admin token is.
    reviewer: std::sync::OnceLock<Arc<dyn CredentialReviewer>>,
}

/// A change to the inventory, for edges that mirror it (the Kubernetes controller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The server was created or changed (registration, boot, administration).
    Changed(String),
    /// The server was deleted.
    Deleted(String),
    /// A BMC operation on the server ended (the server changed too).
    Power(String, crate::inventory::PowerEvent),
    /// The server's provisioning window tripped, or a secret was replayed.
    Alarm(String, crate::inventory::Alarm),
}

/// What the cluster says an operator wants of a server (Kubernetes mode).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub accepted: bool,
    pub cordoned: bool,
    pub environment: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `spec.arm`: a value not acted on yet opens a window (and clears an alarm).
    pub arm: Option<String>,
    /// Who changed it last, as the cluster says (`manager=NAME`, the field manager of the
    /// latest change to its spec or labels): the audit log's actor.
    pub changed_by: Option<String>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("policy", &self.policy.name())
            .finish_non_exhaustive()
    }
}

/// How a failed request reads in the audit log: refused when a credential or a rule
/// said no, failed when something broke.
pub fn audit_outcome(e: &CoreError) -> Outcome {
    match e {
        CoreError::Store(_) | CoreError::Internal(_) | CoreError::Template(_) => Outcome::Failed,
        _ => Outcome::Refused,
    }
}

/// Says who a credential is, from outside the core (Kubernetes mode: the cluster).
pub trait CredentialReviewer: Send + Sync {
    /// The user `token` authenticates as, if that user may operate the fleet; `Err` when
    /// the reviewer could not be asked.
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::result::Result<Option<String>, String>>
                + Send
                + 'a,
        >,
    >;
}

/// The appliance's two long-lived tokens.
#[derive(Clone)]
pub struct Tokens {
    /// For agents an operator runs by hand; never printed into a boot script.
    pub registration: String,
    /// For the admin API.
    pub admin: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens")
    }
}

/// Compares secrets in time independent of where they differ.
pub fn secret_eq(a: &str, b: &str) -> bool {
    secret_eq_bytes(a.as_bytes(), b.as_bytes())
}

/// [`secret_eq`] for bytes (keyed hashes).
pub fn secret_eq_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoreError::Internal(e.to_string()))?
}

impl Core {
    /// Builds the core. `policy` is the active boot policy (the built-in one when no
    /// plugins are loaded); it falls back to the built-in one on any failure. `sealer`
    /// seals what the inventory keeps secret.
    pub fn new(
        config: Arc<Config>,
        inventory: Arc<Inventory>,
        policy: Option<Arc<dyn BootPolicy>>,
        metrics: Arc<Metrics>,
        tokens: Tokens,
        sealer: Arc<Sealer>,
    ) -> Self {
        let fallback = DefaultPolicy {
            config: config.policy.clone(),
        };
        let policy = policy.unwrap_or_else(|| Arc::new(fallback.clone()));
        let audit = Arc::new(AuditLog::new(
            Arc::clone(&inventory),
            config.audit.clone(),
            Arc::clone(&metrics),
        ));
        Core {
            config,
            inventory,
            policy,
            fallback,
            metrics,
            registration_token: tokens.registration,
            admin_token: tokens.admin,
            timeline: Arc::new(Timeline::new()),
            audit,
            // Subscribers that fall this far behind resynchronise from the inventory.
            events: tokio::sync::broadcast::channel(1024).0,
            cluster_environments: RwLock::new(Arc::new(BTreeMap::new())),
            power: None,
            sealer,
            boot_secrets: BootSecrets::default(),
            dhcp_seen: Mutex::new(HashMap::new()),
            agent_tls: std::sync::OnceLock::new(),
            reviewer: std::sync::OnceLock::new(),
        }
    }

    /// Agents register over HTTPS on `port`, pinning the certificate whose sha256 is
    /// `pin`: boot scripts tell them so (`appliance.agent_url`, `appliance.pin`).
    pub fn set_agent_tls(&self, port: u16, pin: String) {
        let _ = self.agent_tls.set((port, pin));
    }

    /// Where an agent that reached us at `base_url` registers, and the pin ("" without
    /// HTTPS).
    fn agent_endpoint(&self, base_url: &str) -> (String, String) {
        match self.agent_tls.get() {
            Some((port, pin)) => {
                let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
                let authority = rest.split('/').next().unwrap_or_default();
                let host = crate::http::config::host_of(authority);
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                (format!("https://{host}:{port}"), pin.clone())
            }
            None => (base_url.to_string(), String::new()),
        }
    }

    /// Turns power control on: BMC operations go through `manager`.
    pub fn with_power(mut self, manager: Arc<crate::bmc::manager::PowerManager>) -> Self {
        self.power = Some(power::PowerControl { manager });
        self
    }

    /// Inventory changes from now on. A receiver that lags gets `Lagged` and should
    /// re-read the whole inventory.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ServerEvent> {
        self.events.subscribe()
    }

    fn changed(&self, id: &str) {
        // No subscriber is fine: nobody mirrors the inventory.
        let _ = self.events.send(ServerEvent::Changed(id.to_string()));
    }

    /// Replaces the environments defined in the cluster. The config's own win on a name
    /// clash (the head node's file is the operator's last word).
    pub fn set_cluster_environments(&self, envs: BTreeMap<String, Environment>) {
        for name in envs.keys() {
            if self.config.environments.contains_key(name) {
                tracing::warn!(
                    environment = %name,
                    "the cluster defines an environment appliance.toml defines too; the file's wins"
                );
            }
        }
        *self
            .cluster_environments
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(envs);
    }

    /// The environment `name`, from the config (borrowed: the boot path's common case)
    /// or the cluster (copied out from under its lock).
    pub fn environment(&self, name: &str) -> Option<std::borrow::Cow<'_, Environment>> {
        use std::borrow::Cow;
        self.config
            .environments
            .get(name)
            .map(Cow::Borrowed)
            .or_else(|| {
                self.cluster_environments
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(name)
                    .cloned()
                    .map(Cow::Owned)
            })
    }

    /// A network-boot client was answered by proxyDHCP (`answered`, a [`Step::Dhcp`]):
    /// its boot has begun, or goes on. `from` is its address when it has one.
    pub fn network_boot_seen(&self, mac: &str, from: Option<IpAddr>, answered: Step) {
        if let Some(mac) = normalize_mac(mac) {
            if let Some(ip) = from {
                self.timeline.bind(ip, &mac, None);
            }
            self.timeline.witness(Who::Mac(&mac), answered);
            self.note_dhcp(&mac);
        }
    }

    /// Each machine's boots as witnessed (the TFTP edge records into it too).
    pub fn timeline(&self) -> &Arc<Timeline> {
        &self.timeline
    }

    /// The audit log (the edges record the requests they refuse before the core sees
    /// them; its writer task runs beside the servers).
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// Server `id`'s boots as witnessed, step by step, oldest first.
    pub async fn server_boots(&self, id: &str) -> Result<Vec<Boot>> {
        let s = self.server(id).await?;
        Ok(self.timeline.boots_of(&s.macs))
    }

    /// The machines witnessed booting, registered or not (an unknown one by its MAC, or
    /// by its address until its MAC is known), the most recently active first.
    pub fn witnessed(&self, limit: usize) -> Vec<WitnessedMachine> {
        self.timeline.recent(limit)
    }

    /// One witnessed machine by MAC (or `ip:<address>`).
    pub fn witnessed_one(&self, key: &str) -> Result<WitnessedMachine> {
        let key = normalize_mac(key).unwrap_or_else(|| key.to_string());
        self.timeline
            .machine(&key)
            .ok_or_else(|| CoreError::NotFound(format!("no boot of {key} was witnessed")))
    }

    /// The configuration the core runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics every edge records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether `token` is the admin token.
    pub fn is_admin(&self, token: &str) -> bool {
        secret_eq(token, &self.admin_token)
    }

    /// Kubernetes mode: console credentials other than the admin token are asked of
    /// `reviewer` (the cluster's TokenReview and SubjectAccessReview).
    pub fn set_reviewer(&self, reviewer: Arc<dyn CredentialReviewer>) {
        let _ = self.reviewer.set(reviewer);
    }

    /// The operator a console credential names: `admin` for the admin token; in
    /// Kubernetes mode, `kubernetes <user>` for a token of a user the cluster allows to
    /// update Servers; `None` for anything else.
    pub async fn operator(&self, token: &str) -> Result<Option<String>> {
        if self.is_admin(token) {
            return Ok(Some("admin".into()));
        }
        match self.reviewer.get() {
            Some(r) if !token.is_empty() => r.review(token).await.map_err(CoreError::Internal),
            _ => Ok(None),
        }
    }

    /// Whether `token` is the registration token.
    pub fn is_registration(&self, token: &str) -> bool {
        secret_eq(token, &self.registration_token)
    }

    // ---- boot ----

    /// Decides how a machine boots and renders the script it gets. A known server's
    /// boot goes through its provisioning window ([`identity`]): only the window's
    /// claimant is handed a secret.
    #[tracing::instrument(skip(self, req), fields(uuid = req.uuid.as_deref(), mac = req.mac.as_deref(), source = %req.source))]
    pub async fn decide_boot(&self, req: BootRequest) -> Result<BootScript> {
        let started = Instant::now();
        let uuid = req.uuid.as_deref().and_then(normalize_uuid);
        let mac = req.mac.as_deref().and_then(normalize_mac);
        let arch = req.arch.as_deref().filter(|a| {
            !a.is_empty()
                && a.len() <= 32
                && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        // A read transaction: no fsync, no lock against writers, microseconds. Run inline
        // rather than paying a thread handoff on the hottest path.
        let server = self
            .inventory
            .find_for_boot(uuid.as_deref(), mac.as_deref())?;
        let facts = facts_for(
            uuid.clone(),
            mac.clone(),
            arch.map(String::from),
            req.source,
            server.as_ref(),
        );
        // A machine in a cluster's life boots what that life says; the policy decides
        // for everyone else.
        let lifecycle = server.as_ref().and_then(|s| self.lifecycle_boot(s));
        let installed_now = lifecycle.as_ref().is_some_and(|(_, done)| *done);
        let (mut action, mut by) = match lifecycle {
            Some((action, _)) => (action, "cluster".to_string()),
            None => match self.policy.decide_by(&facts).await {
                Ok(decided) => decided,
                Err(e) => {
                    self.metrics.policy_fallbacks.inc();
                    tracing::warn!(error = %e, kind = e.kind, "boot policy failed; using the built-in decision");
                    (
                        self.fallback.decide_now(&facts),
                        format!(
                            "{} (after {} failed)",
                            self.fallback.name(),
                            self.policy.name()
                        ),
                    )
                }
            },
        };
        let wants = match &action {
            BootAction::Environment(_) => Some(SecretKind::ConfigToken),
            BootAction::Discover => Some(SecretKind::DiscoverSecret),
            BootAction::Wipe => Some(SecretKind::WipeSecret),
            _ => None,
        };
        let mut secrets = BootSecretsFor::default();
        let bound = |s: &Self| {
            matches!(
                wants,
                Some(SecretKind::DiscoverSecret | SecretKind::WipeSecret)
            )
            .then(|| {
                s.boot_bound_secret(
                    uuid.as_deref(),
                    mac.as_deref(),
                    req.source,
                    wants == Some(SecretKind::WipeSecret),
                )
            })
        };
        let server = match server {
            None => {
                secrets.registration = bound(self);
                None
            }
            Some(server) => {
                let requester = Requester {
                    source: req.source,
                    mac: mac.clone(),
                    uuid: uuid.clone(),
                    at: now(),
                };
                let (stored, admission, secret, by_claimant) = {
                    let record = BootRecord {
                        at: requester.at,
                        action: action.name().into(),
                        environment: self.environment_of(&action).map(String::from),
                        source: Some(req.source),
                    };
                    self.admit_boot(&server, requester, wants, record).await?
                };
                match admission {
                    Admission::Claimant => match wants {
                        Some(SecretKind::ConfigToken) => secrets.config = secret,
                        Some(_) => secrets.registration = secret,
                        None => {}
                    },
                    Admission::Outside => secrets.registration = bound(self),
                    Admission::Tripped(_) | Admission::Alarmed if wants.is_some() => {
                        let why = stored
                            .alarm
                            .as_ref()
                            .map(|a| a.message.clone())
                            .unwrap_or_default();
                        action = BootAction::Deny(format!(
                            "server {} stands in alarm ({why}); an operator must arm it again",
                            stored.id
                        ));
                        Metrics::inc(&self.metrics.boot_decisions, "action", "alarm");
                        by = "alarm".into();
                    }
                    _ => {}
                }
                self.changed(&stored.id);
                self.after_lifecycle_boot(&stored.id, installed_now && by_claimant)
                    .await;
                Some(stored)
            }
        };
        Metrics::inc(&self.metrics.boot_decisions, "action", action.name());
        if let Some(mac) = &mac {
            // The script is asked for from the machine's address: what that address
            // fetched before (and will fetch) is this machine's.
            self.timeline.bind(req.source, mac, uuid.as_deref());
        }
        let step = Step::BootScript {
            action: action.name().into(),
            by,
        };
        match (&mac, &uuid) {
            (Some(mac), _) => self.timeline.witness(Who::Mac(mac), step),
            (None, Some(uuid)) => {
                let macs = server.as_ref().map_or(&[][..], |s| &s.macs[..]);
                self.timeline.witness(Who::Uuid(uuid, macs), step);
            }
            (None, None) => self.timeline.witness(Who::Address(req.source), step),
        }
        let (script, env_name) = self.render(
            &action,
            &facts,
            server.as_ref(),
            &req.base_url,
            arch.unwrap_or(""),
            &secrets,
        )?;
        self.metrics
            .boot_script_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            action = action.name(),
            environment = env_name.as_deref(),
            secret = secrets.config.is_some() || secrets.registration.is_some(),
            "boot decided"
        );
        Ok(script)
    }

    /// The environment an action boots, by name.
    fn environment_of<'a>(&'a self, action: &'a BootAction) -> Option<&'a str> {
        match action {
            BootAction::Discover => Some(&self.config.discovery_environment),
            BootAction::Wipe => Some(&self.config.wipe_environment),
            BootAction::Environment(name) => Some(name),
            _ => None,
        }
    }

    fn render(
        &self,
        action: &BootAction,
        facts: &MachineFacts,
        server: Option<&Server>,
        base_url: &str,
        arch: &str,
        secrets: &BootSecretsFor,
    ) -> Result<(BootScript, Option<String>)> {
        let base_url = self.config.http.public_url.as_deref().unwrap_or(base_url);
        let method = self.config.policy.local_disk_method(arch);
        let (kind, env, reason) = match action {
            BootAction::Discover => (
                ScriptKind::Discover,
                Some(self.config.discovery_environment.as_str()),
                None,
            ),
            BootAction::Wipe => (
                ScriptKind::Wipe,
                Some(self.config.wipe_environment.as_str()),
                None,
            ),
            BootAction::Environment(name) => (ScriptKind::Environment, Some(name.as_str()), None),
            BootAction::LocalDisk if method == LocalDiskMethod::Http404 => {
                return Ok((BootScript::FallThrough, None));
            }
            BootAction::LocalDisk => (ScriptKind::LocalDisk, None, None),
            BootAction::Deny(r) => (ScriptKind::Deny, None, Some(r.as_str())),
            BootAction::Script(text) => {
                let body = if text.starts_with("#!ipxe") {
                    text.clone()
                } else {
                    format!("#!ipxe\n{text}")
                };
                return Ok((
                    BootScript::Script {
                        action: "script",
                        body,
                    },
                    None,
                ));
            }
        };
        let env = match env {
            Some(name) => match self.environment(name) {
                Some(e) => Some(e),
                None => {
                    // A policy naming an environment we do not have must not boot something else.
                    tracing::error!(
                        environment = name,
                        "boot policy chose an undefined environment"
                    );
                    let deny = BootAction::Deny(format!("environment {name} is not defined"));
                    return self.render(&deny, facts, server, base_url, arch, secrets);
                }
            },
            None => None,
        };
        let server_json = server
            .map(|s| serde_json::to_value(s).unwrap_or_default())
            .unwrap_or_else(|| json!({}));
        let (agent_url, pin) = self.agent_endpoint(base_url);
        let mut ctx = json!({
            "action": kind.name(),
            "appliance": {"url": base_url, "agent_url": agent_url, "pin": pin},
            "machine": {
                "uuid": facts.uuid.clone().unwrap_or_default(),
                "mac": facts.mac.clone().unwrap_or_default(),
                "arch": arch,
                "address": facts.client_address.to_string(),
            },
            "server": server_json,
            // Empty outside a window: the script carries no secret.
            "boot_token": secrets.config.as_deref().unwrap_or_default(),
            "registration_token": secrets.registration.as_deref().unwrap_or_default(),
            "local_disk": {"method": method.name()},
            "reason": reason.unwrap_or_default(),
            "env": {},
        });
        if let Some(env) = &env {
            let file_url = |p: &std::path::Path| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Unescaped here: the template escapes every value it prints.
                let url = format!("{base_url}/env/{}/{name}", env.name);
                (name, url)
            };
            let (kernel_name, kernel_url) = file_url(&env.kernel);
            let initrds: Vec<_> = env
                .initrds
                .iter()
                .map(|p| {
                    let (name, url) = file_url(p);
                    json!({"name": name, "url": url})
                })
                .collect();
            ctx["env"] = json!({"name": env.name, "kernel_url": kernel_url, "kernel_name": kernel_name, "initrds": initrds});
            let cmdline = env.cmdline.render(&ctx)?;
            ctx["env"]["cmdline"] = json!(cmdline);
        }
        let body = self.config.templates.get(kind).render(&ctx)?;
        Ok((
            BootScript::Script {
                action: kind.name(),
                body,
            },
            env.map(|e| e.name.clone()),
        ))
    }

    // ---- registration ----

    /// What an agent does once registered: reboot into what its server boots next, else
    /// power off.
    fn registration_answer(&self, s: &Server, source: IpAddr, wiped: bool) -> RegistrationResponse {
        let facts = facts_for(
            Some(s.uuid.clone()),
            s.macs.first().cloned(),
            None,
            source,
            Some(s),
        );
        let next = match self.lifecycle_boot(s) {
            Some((action, _)) => action,
            None => self.fallback.decide_now(&facts),
        };
        let action = match next {
            _ if wiped => NextAction::PowerOff,
            BootAction::Environment(_) | BootAction::Wipe => NextAction::Reboot,
            _ => NextAction::PowerOff,
        };
        RegistrationResponse {
            server_id: s.id.clone(),
            action,
            uuid_conflict: s.uuid_conflict,
        }
    }

    // ---- administration ----

    /// Every server.
    pub async fn servers(&self) -> Result<Vec<Server>> {
        let inv = Arc::clone(&self.inventory);
        blocking(move || Ok(inv.list()?)).await
    }

    /// One server.
    pub async fn server(&self, id: &str) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let id = id.to_string();
        blocking(move || Ok(inv.get(&id)?)).await
    }

    /// Changes a server with an administrative edit. In Kubernetes mode the cluster owns
    /// acceptance, cordons, environments and labels: those edits are refused, so kubectl
    /// and the admin API can never disagree.
    pub async fn edit_server(&self, id: &str, edit: ServerEdit) -> Result<Server> {
        if self.config.kubernetes.is_some()
            && matches!(
                edit,
                ServerEdit::Accepted(_)
                    | ServerEdit::Cordoned(_)
                    | ServerEdit::Environment(_)
                    | ServerEdit::Labels(_)
            )
        {
            return Err(CoreError::Managed(format!(
                "Kubernetes mode: change Server {id} with kubectl (spec.accepted, spec.cordoned, spec.environmentRef, labels)"
            )));
        }
        if matches!(edit, ServerEdit::Config(_))
            && let Some(claim) = self.server(id).await?.provisioning.claim
        {
            return Err(CoreError::Managed(format!(
                "server {id} is claimed by {}: its configuration is that machine's bootstrap data",
                claim.machine
            )));
        }
        if let ServerEdit::Environment(Some(env)) = &edit
            && self.environment(env).is_none()
        {
            return Err(CoreError::Invalid(format!(
                "environment {env:?} is not defined"
            )));
        }
        let edit = match edit {
            ServerEdit::Config(Some(blob)) => ServerEdit::Config(Some(
                self.sealer
                    .seal_config(id, &blob)
                    .map_err(|e| CoreError::Internal(e.to_string()))?,
            )),
            other => other,
        };
        let inv = Arc::clone(&self.inventory);
        let id = id.to_string();
        let s = blocking(move || {
            Ok(match edit {
                ServerEdit::Config(blob) => inv.set_config(&id, blob.as_deref())?,
                other => inv.update(&id, |s| match other {
                    ServerEdit::Accepted(v) => s.accepted = v,
                    ServerEdit::Cordoned(v) => s.cordoned = v,
                    ServerEdit::Environment(e) => s.environment = e,
                    ServerEdit::Labels(l) => s.labels = l,
                    ServerEdit::BmcAddress(a) => s.bmc_address = a,
                    ServerEdit::Config(_) => {}
                })?,
            })
        })
        .await?;
        tracing::info!(id = %s.id, "server changed by the admin API");
        self.changed(&s.id);
        Ok(s)
    }

    /// Applies what the cluster wants of a server; `None` when that is already so. The
    /// environment is not checked: the cluster may name one it defines a moment later,
    /// and until then the boot is denied, never substituted.
    pub async fn apply_desired(&self, id: &str, want: DesiredState) -> Result<Option<Server>> {
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        let current = blocking(move || Ok(inv.get(&key)?)).await?;
        let arm = want
            .arm
            .clone()
            .filter(|a| current.arm_key.as_ref() != Some(a));
        let who = match &want.changed_by {
            Some(manager) => format!("kubernetes {manager}"),
            None => "kubernetes".to_string(),
        };
        if let Some(value) = &arm {
            self.arm(id, "spec.arm").await?;
            self.audit.record(
                who.clone(),
                None,
                "server_armed",
                Some(id),
                Outcome::Ok,
                Some(format!("spec.arm = {value:?}")),
            );
            let inv = Arc::clone(&self.inventory);
            let (key, value) = (id.to_string(), value.clone());
            blocking(move || Ok(inv.update(&key, |s| s.arm_key = Some(value))?)).await?;
        }
        if current.accepted == want.accepted
            && current.cordoned == want.cordoned
            && current.environment == want.environment
            && current.labels == want.labels
        {
            return Ok(arm.map(|_| current));
        }
        let mut what = Vec::new();
        if current.accepted != want.accepted {
            what.push(format!("accepted = {}", want.accepted));
        }
        if current.cordoned != want.cordoned {
            what.push(format!("cordoned = {}", want.cordoned));
        }
        if current.environment != want.environment {
            what.push(format!("environment = {:?}", want.environment));
        }
        if current.labels != want.labels {
            what.push(format!("labels = {:?}", want.labels));
        }
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        let s = blocking(move || {
            Ok(inv.update(&key, |s| {
                s.accepted = want.accepted;
                s.cordoned = want.cordoned;
                s.environment = want.environment;
                s.labels = want.labels;
            })?)
        })
        .await?;
        tracing::info!(id = %s.id, accepted = s.accepted, cordoned = s.cordoned, environment = s.environment.as_deref(), "server changed by the cluster");
        self.audit.record(
            who,
            None,
            "server_spec_applied",
            Some(&s.id),
            Outcome::Ok,
            Some(what.join(", ")),
        );
        self.changed(&s.id);
        Ok(Some(s))
    }

    /// Deletes a server.
    pub async fn delete_server(&self, id: &str) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        let s = blocking(move || Ok(inv.delete(&key)?)).await?;
        let _ = self.events.send(ServerEvent::Deleted(s.id.clone()));
        Ok(s)
    }
}

/// One administrative change to a server.
#[derive(Debug, Clone)]
pub enum ServerEdit {
    Accepted(bool),
    Cordoned(bool),
    Environment(Option<String>),
    Labels(std::collections::BTreeMap<String, String>),
    BmcAddress(Option<String>),
    Config(Option<Vec<u8>>),
}

fn facts_for(
    uuid: Option<String>,
    mac: Option<String>,
    arch: Option<String>,
    source: IpAddr,
    server: Option<&Server>,
) -> MachineFacts {
    MachineFacts {
        uuid,
        mac,
        arch,
        client_address: source,
        inventory: server
            .map(|s| InventoryFacts {
                registered: true,
                server_id: Some(s.id.clone()),
                accepted: s.accepted,
                cordoned: s.cordoned,
                environment: s.environment.clone(),
                labels: s.labels.clone(),
            })
            .unwrap_or_default(),
        hardware: server
            .map(|s| HardwareSummary {
                vendor: s.hardware.vendor.clone(),
                product: s.hardware.product.clone(),
                cpus: s.hardware.cpu.count,
                memory_bytes: s.hardware.memory_bytes,
                disks: s.hardware.disks.len() as u32,
                nics: s.hardware.nics.len() as u32,
            })
            .unwrap_or_default(),
    }
}
