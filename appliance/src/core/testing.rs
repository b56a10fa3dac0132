//! The seam under the core: a [`Core`] over an in-memory inventory with the built-in
//! policy, no sockets, and a power manager with no drivers (BMC settings are kept and
//! sealed; every power operation fails `no_driver`), and fixture builders for the
//! machines tests put in it. Rules that need no process (windows, secrets, lifecycle boots, claims) are
//! tested here in milliseconds; the spawned binary and the real peers test the edges.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::{BootRequest, BootScript, Core, RegistrationProof, ServerEdit, Tokens};
use crate::bmc::driver::NoDrivers;
use crate::bmc::manager::PowerManager;
use crate::config::{Config, Overrides};
use crate::inventory::{Inventory, Server};
use crate::metrics::Metrics;
use crate::registration::{
    Disk, Hardware, Nic, RegistrationMode, RegistrationRequest, RegistrationResponse,
};
use crate::sealing::Sealer;

pub const REGISTRATION_TOKEN: &str = "registration-token-for-tests-01";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-000000001";

/// The configuration every test core starts from: one install environment whose
/// command line carries the window's token.
const BASE: &str = r#"
[tokens]
registration = "registration-token-for-tests-01"
admin = "admin-token-for-tests-000000001"

[environments.talos]
kernel = "talos/vmlinuz"
initrds = ["talos/initramfs.xz"]
cmdline = "talos.config={{ appliance.url }}/configdata?uuid={{ machine.uuid }}&token={{ boot_token }}"
"#;

impl Core {
    /// A core with the base test configuration.
    pub fn test() -> Core {
        Core::test_with("")
    }

    /// A core whose configuration is the base one plus `extra` (more TOML tables).
    pub fn test_with(extra: &str) -> Core {
        let src = format!("{BASE}\n{extra}");
        let config = Config::from_source("<test>", &src, Path::new(""), &Overrides::default())
            .unwrap_or_else(|e| panic!("test config: {e}"));
        let metrics = Arc::new(Metrics::new());
        let power = PowerManager::new(
            Arc::new(NoDrivers),
            config.bmc.manager.clone(),
            Arc::clone(&metrics),
        );
        Core::new(
            Arc::new(config),
            Arc::new(Inventory::in_memory().expect("in-memory inventory")),
            None,
            metrics,
            Tokens {
                registration: REGISTRATION_TOKEN.into(),
                admin: ADMIN_TOKEN.into(),
            },
            Arc::new(Sealer::ephemeral().expect("sealer")),
        )
        .with_power(Arc::new(power))
    }

    /// The metrics as `/metrics` shows them (for counting outcomes).
    pub fn metrics_text(&self) -> String {
        self.metrics().render()
    }
}

/// A test machine: what its firmware says at boot and what its agent registers.
#[derive(Debug, Clone)]
pub struct Machine {
    pub uuid: String,
    pub mac: String,
    pub source: IpAddr,
    pub hardware: Hardware,
}

impl Machine {
    /// Machine number `n`: its own UUID, MAC and address on 10.0.0.0/24.
    pub fn test(n: u8) -> Machine {
        let mac = format!("52:54:00:00:00:{n:02x}");
        Machine {
            uuid: format!("00000000-0000-4000-8000-{n:012x}"),
            mac: mac.clone(),
            source: IpAddr::from([10, 0, 0, n]),
            hardware: Hardware {
                vendor: "QEMU".into(),
                nics: vec![Nic {
                    name: "eth0".into(),
                    mac,
                    ..Default::default()
                }],
                disks: vec![Disk {
                    name: "vda".into(),
                    size_bytes: 1 << 34,
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    /// The same machine asking from another address.
    pub fn from(&self, source: [u8; 4]) -> Machine {
        Machine {
            source: IpAddr::from(source),
            ..self.clone()
        }
    }

    /// Its agent's registration in `mode`.
    pub fn registration(&self, mode: RegistrationMode) -> RegistrationRequest {
        RegistrationRequest {
            uuid: self.uuid.clone(),
            hardware: self.hardware.clone(),
            mode,
        }
    }

    /// Its `/boot.ipxe` request.
    pub fn boot_request(&self) -> BootRequest {
        BootRequest {
            uuid: Some(self.uuid.clone()),
            mac: Some(self.mac.clone()),
            arch: Some("x86_64".into()),
            source: self.source,
            base_url: "http://10.0.0.254:8080".into(),
        }
    }
}

/// What a boot script gave a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// `discover`, `environment`, `local-disk`, `wipe`, `deny`, … or `fall-through`.
    pub action: String,
    pub body: String,
}

impl Booted {
    /// The value of `key=` on the script's kernel command line ("" when absent or empty).
    pub fn param(&self, key: &str) -> String {
        let at = format!("{key}=");
        self.body
            .split(|c: char| c.is_whitespace() || c == '&' || c == '?')
            .find_map(|w| w.strip_prefix(at.as_str()))
            .unwrap_or_default()
            .to_string()
    }

    /// The `/configdata` token the script carries ("" when none).
    pub fn token(&self) -> String {
        self.param("token")
    }

    /// The registration secret the script carries ("" when none).
    pub fn registration_secret(&self) -> String {
        self.param("arges.token")
    }
}

/// The core's operations as a test drives them, each unwrapped where a failure is the
/// test's failure.
impl Core {
    /// `machine` boots: the script it gets.
    pub async fn boot(&self, machine: &Machine) -> Booted {
        match self.decide_boot(machine.boot_request()).await {
            Ok(BootScript::Script { action, body }) => Booted {
                action: action.to_string(),
                body,
            },
            Ok(BootScript::FallThrough) => Booted {
                action: "fall-through".into(),
                body: String::new(),
            },
            Err(e) => panic!("boot of {}: {e}", machine.uuid),
        }
    }

    /// `machine`'s agent registers with the shared token.
    pub async fn register_shared(&self, machine: &Machine) -> RegistrationResponse {
        self.register(
            machine.registration(RegistrationMode::Discover),
            RegistrationProof::Shared,
            machine.source,
        )
        .await
        .unwrap_or_else(|e| panic!("registration of {}: {e}", machine.uuid))
    }

    /// `machine` registered, accepted into `talos`, holding `config`.
    pub async fn provisioned(&self, machine: &Machine, config: &str) -> Server {
        let id = self.register_shared(machine).await.server_id;
        for edit in [
            ServerEdit::Accepted(true),
            ServerEdit::Environment(Some("talos".into())),
            ServerEdit::Config(Some(config.as_bytes().to_vec())),
        ] {
            self.edit_server(&id, edit).await.expect("admin edit");
        }
        self.server(&id).await.expect("server")
    }
}
