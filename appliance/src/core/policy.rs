//! Boot policy: the facts a decision sees, the actions it may take, and the built-in
//! default policy.
//!
//! [`BootPolicy`] is the seam plugins fill: the WebAssembly host implements it for each
//! `boot-policy` component, and the core falls back to [`DefaultPolicy`] whenever a plugin
//! fails. The shapes mirror the WIT contract's `machine-facts` and `boot-action`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::config::{PolicyConfig, Unaccepted};

/// Where a machine stands in the inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryFacts {
    pub registered: bool,
    pub server_id: Option<String>,
    pub accepted: bool,
    pub cordoned: bool,
    pub environment: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// A summary of the machine's hardware, as registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareSummary {
    pub vendor: String,
    pub product: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disks: u32,
    pub nics: u32,
}

/// Everything a boot decision may look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFacts {
    pub uuid: Option<String>,
    pub mac: Option<String>,
    /// iPXE's `${buildarch}`: `x86_64`, `i386`, `arm64`, …
    pub arch: Option<String>,
    pub client_address: IpAddr,
    pub inventory: InventoryFacts,
    pub hardware: HardwareSummary,
}

/// What a machine is told to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action", content = "value")]
pub enum BootAction {
    /// Boot the discovery environment and register.
    Discover,
    /// Boot the named environment.
    Environment(String),
    /// Boot from the local disk.
    LocalDisk,
    /// Boot the wipe environment.
    Wipe,
    /// Serve this iPXE script as it is.
    Script(String),
    /// Refuse to boot, with a reason shown on the console.
    Deny(String),
}

impl BootAction {
    /// Label for metrics and boot history.
    pub fn name(&self) -> &'static str {
        match self {
            BootAction::Discover => "discover",
            BootAction::Environment(_) => "environment",
            BootAction::LocalDisk => "local-disk",
            BootAction::Wipe => "wipe",
            BootAction::Script(_) => "script",
            BootAction::Deny(_) => "deny",
        }
    }
}

/// Why a policy gave no decision.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy {policy:?}: {message}")]
pub struct PolicyError {
    pub policy: String,
    /// Metric label: `trap`, `timeout`, `memory`, `malformed`, `refused`, …
    pub kind: &'static str,
    pub message: String,
}

/// A boxed future, so policies can be trait objects and still run async (plugins do).
pub type Decision<'a> = Pin<Box<dyn Future<Output = Result<BootAction, PolicyError>> + Send + 'a>>;

/// A decision with who made it (a plugin's name, or the policy's own).
pub type DecisionBy<'a> =
    Pin<Box<dyn Future<Output = Result<(BootAction, String), PolicyError>> + Send + 'a>>;

/// Decides how a machine boots.
pub trait BootPolicy: Send + Sync {
    /// A name for logs and metrics.
    fn name(&self) -> &str;
    /// Decides for `facts`.
    fn decide<'a>(&'a self, facts: &'a MachineFacts) -> Decision<'a>;
    /// Decides for `facts` and says who did: a chain names the member that decided.
    fn decide_by<'a>(&'a self, facts: &'a MachineFacts) -> DecisionBy<'a> {
        Box::pin(async move {
            let action = self.decide(facts).await?;
            Ok((action, self.name().to_string()))
        })
    }
}

/// The behaviour a user gets with no plugins: unknown machines discover; registered but
/// unaccepted ones boot from disk (or discover again, per config); accepted ones boot their
/// environment (or the default one, else the disk); cordoned ones boot from disk.
#[derive(Debug, Clone)]
pub struct DefaultPolicy {
    pub config: PolicyConfig,
}

impl DefaultPolicy {
    /// The decision, synchronously (it never fails).
    pub fn decide_now(&self, facts: &MachineFacts) -> BootAction {
        let inv = &facts.inventory;
        if !inv.registered {
            return BootAction::Discover;
        }
        if inv.cordoned {
            return BootAction::LocalDisk;
        }
        if !inv.accepted {
            return match self.config.unaccepted {
                Unaccepted::LocalDisk => BootAction::LocalDisk,
                Unaccepted::Discover => BootAction::Discover,
            };
        }
        match inv
            .environment
            .as_ref()
            .or(self.config.default_environment.as_ref())
        {
            Some(env) => BootAction::Environment(env.clone()),
            None => BootAction::LocalDisk,
        }
    }
}

impl BootPolicy for DefaultPolicy {
    fn name(&self) -> &str {
        "built-in"
    }

    fn decide<'a>(&'a self, facts: &'a MachineFacts) -> Decision<'a> {
        let action = self.decide_now(facts);
        Box::pin(async move { Ok(action) })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::LocalDiskMethod;

    pub fn facts() -> MachineFacts {
        MachineFacts {
            uuid: Some("4c4c4544-0042-3510-8051-b4c04f595031".into()),
            mac: Some("52:54:00:12:34:56".into()),
            arch: Some("x86_64".into()),
            client_address: "10.0.0.7".parse().unwrap(),
            inventory: InventoryFacts::default(),
            hardware: HardwareSummary::default(),
        }
    }

    pub fn policy(unaccepted: Unaccepted, default_env: Option<&str>) -> DefaultPolicy {
        DefaultPolicy {
            config: PolicyConfig {
                unaccepted,
                default_environment: default_env.map(String::from),
                local_disk_method: LocalDiskMethod::Exit,
                local_disk_method_by_arch: Default::default(),
                max_unaccepted: 0,
            },
        }
    }

    /// (registered, accepted, cordoned, environment, unaccepted, default env, expected action)
    type Case = (
        bool,
        bool,
        bool,
        Option<&'static str>,
        Unaccepted,
        Option<&'static str>,
        BootAction,
    );

    /// The decision table: (registered, accepted, cordoned, environment, unaccepted, default env) -> action.
    #[test]
    fn default_policy_table() {
        use BootAction::*;
        let env = |s: &str| Environment(s.into());
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (false, false, false, None,      Unaccepted::LocalDisk, None,      Discover),
            (false, true,  true,  Some("x"), Unaccepted::LocalDisk, Some("d"), Discover),
            (true,  false, false, None,      Unaccepted::LocalDisk, None,      LocalDisk),
            (true,  false, false, Some("x"), Unaccepted::Discover,  None,      Discover),
            (true,  true,  false, Some("x"), Unaccepted::LocalDisk, Some("d"), env("x")),
            (true,  true,  false, None,      Unaccepted::LocalDisk, Some("d"), env("d")),
            (true,  true,  false, None,      Unaccepted::LocalDisk, None,      LocalDisk),
            (true,  true,  true,  Some("x"), Unaccepted::LocalDisk, None,      LocalDisk),
            (true,  false, true,  None,      Unaccepted::Discover,  None,      LocalDisk),
        ];
        for (registered, accepted, cordoned, environment, unaccepted, default_env, want) in cases {
            let mut f = facts();
            f.inventory = InventoryFacts {
                registered,
                accepted,
                cordoned,
                environment: environment.map(String::from),
                ..Default::default()
            };
            assert_eq!(
                policy(unaccepted, default_env).decide_now(&f),
                want,
                "registered={registered} accepted={accepted} cordoned={cordoned} env={environment:?}"
            );
        }
    }
}
