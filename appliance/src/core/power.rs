//! The core's power operations: configure a server's BMC (the password sealed on the
//! way in), and run status, power and boot-device operations through the power manager,
//! recording each outcome on the server. A failed BMC operation is not a core error: it
//! is an outcome, recorded and returned with its reason.

use crate::audit::Outcome as Audited;
use crate::timeline::{Step, Who};
use std::sync::Arc;

use super::{Core, CoreError, Result, ServerEvent, blocking};
use crate::bmc::link::Target;
use crate::bmc::manager::{Job, Operation, Outcome, PowerManager};
use crate::bmc::{BmcSettings, BootSetting, PowerAction};
use crate::inventory::{CloseReason, PowerEvent, Server, now};

/// What the core holds for power control.
pub(super) struct PowerControl {
    pub(super) manager: Arc<PowerManager>,
}

/// A BMC operation's result as the API returns it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PowerReport {
    pub server: String,
    pub event: PowerEvent,
    /// The power record after the operation.
    pub power: crate::inventory::PowerRecord,
}

impl Core {
    fn power_control(&self) -> Result<&PowerControl> {
        self.power
            .as_ref()
            .ok_or_else(|| CoreError::Internal("power control is not running".into()))
    }

    /// The loaded BMC drivers.
    pub fn bmc_drivers(&self) -> Vec<String> {
        self.power
            .as_ref()
            .map(|p| p.manager.drivers())
            .unwrap_or_default()
    }

    /// Sets a server's BMC and seals its password (or with `None`, removes both).
    pub async fn set_bmc(&self, id: &str, bmc: Option<(BmcSettings, String)>) -> Result<Server> {
        let sealed = match bmc {
            Some((settings, password)) => {
                settings.validate().map_err(CoreError::Invalid)?;
                if password.is_empty() || password.len() > 256 {
                    return Err(CoreError::Invalid(
                        "bmc.password must be 1 to 256 bytes".into(),
                    ));
                }
                self.power_control()?;
                let sealed = self
                    .sealer
                    .seal(id, &password)
                    .map_err(|e| CoreError::Internal(e.to_string()))?;
                Some((settings, sealed))
            }
            None => None,
        };
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        let s = blocking(move || Ok(inv.set_bmc(&key, sealed)?)).await?;
        tracing::info!(id = %s.id, bmc = s.bmc.as_ref().map(|b| b.authority()), "server BMC set");
        self.changed(&s.id);
        Ok(s)
    }

    /// Sets the BMC unless it already is exactly this (the password compared after
    /// opening the sealed one); whether it changed.
    pub async fn set_bmc_if_changed(
        &self,
        id: &str,
        settings: BmcSettings,
        password: String,
    ) -> Result<bool> {
        self.power_control()?;
        let (current, sealed) = self.server_with_secret(id).await?;
        let same_password =
            |s: Vec<u8>| self.sealer.open(id, &s).ok().as_deref() == Some(password.as_str());
        if current.bmc.as_ref() == Some(&settings) && sealed.is_some_and(same_password) {
            return Ok(false);
        }
        self.set_bmc(id, Some((settings, password))).await?;
        Ok(true)
    }

    /// Lends server `id` the BMC a MetalMachine claim (`uid`) names, for that claim only
    /// (forgotten on release). Refused (conflict) when the server has its own BMC at
    /// another address: a tenant may not point the appliance at a host of its choosing
    /// for someone else's server. Unchanged settings are left alone.
    pub async fn lend_bmc(
        &self,
        id: &str,
        uid: &str,
        settings: BmcSettings,
        password: String,
    ) -> Result<Server> {
        self.power_control()?;
        settings.validate().map_err(CoreError::Invalid)?;
        if password.is_empty() || password.len() > 256 {
            return Err(CoreError::Invalid(
                "bmc.password must be 1 to 256 bytes".into(),
            ));
        }
        let (current, sealed) = self.server_with_secret(id).await?;
        let same_password =
            |s: Vec<u8>| self.sealer.open(id, &s).ok().as_deref() == Some(password.as_str());
        if current.bmc_lent_to.as_deref() == Some(uid)
            && current.bmc.as_ref() == Some(&settings)
            && sealed.is_some_and(same_password)
        {
            return Ok(current);
        }
        let sealed = self
            .sealer
            .seal(id, &password)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let inv = Arc::clone(&self.inventory);
        let (key, uid) = (id.to_string(), uid.to_string());
        let s = blocking(move || Ok(inv.lend_bmc(&key, &uid, (settings, sealed))?)).await?;
        tracing::info!(id = %s.id, bmc = s.bmc.as_ref().map(|b| b.authority()), lent_to = s.bmc_lent_to.as_deref(), "server BMC lent to a claim");
        self.changed(&s.id);
        Ok(s)
    }

    /// Forgets the BMC lent to claim `uid` (its release is done).
    pub async fn forget_lent_bmc(&self, id: &str, uid: &str) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let (key, uid) = (id.to_string(), uid.to_string());
        let s = blocking(move || Ok(inv.forget_lent_bmc(&key, &uid)?)).await?;
        self.changed(&s.id);
        Ok(s)
    }

    /// Reads the power state (and next boot) from the server's BMC.
    pub async fn bmc_status(&self, id: &str) -> Result<PowerReport> {
        self.bmc_operation(id, Operation::Status).await
    }

    /// Changes the server's power; the next boot set earlier is sent again first. A
    /// power-on, cycle or reset opens a provisioning window first (the appliance now
    /// expects this machine's boot), closed again if the BMC did not do it.
    pub async fn bmc_power(&self, id: &str, action: PowerAction) -> Result<PowerReport> {
        let window = match action {
            PowerAction::On | PowerAction::Cycle | PowerAction::Reset => self
                .open_window(id, &format!("power {}", action.as_str()))
                .await?
                .window
                .map(|w| w.id),
            PowerAction::Off | PowerAction::SoftOff => None,
        };
        let report = self.bmc_operation(id, Operation::Power(action)).await;
        if let Some(w) = &window
            && !report.as_ref().is_ok_and(|r| r.event.ok)
        {
            self.close_window(id, Some(w), CloseReason::PowerFailed)
                .await?;
        }
        report
    }

    /// Sets the server's next boot (and remembers it for the next power-on).
    pub async fn bmc_boot_device(&self, id: &str, boot: BootSetting) -> Result<PowerReport> {
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        blocking(move || Ok(inv.update(&key, |s| s.power.next_boot = Some(boot))?)).await?;
        self.bmc_operation(id, Operation::BootDevice(boot)).await
    }

    async fn server_with_secret(&self, id: &str) -> Result<(Server, Option<Vec<u8>>)> {
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        blocking(move || Ok(inv.with_bmc_secret(&key)?)).await
    }

    async fn bmc_operation(&self, id: &str, operation: Operation) -> Result<PowerReport> {
        let control = self.power_control()?;
        let (server, sealed) = self.server_with_secret(id).await?;
        let Some(settings) = server.bmc.clone() else {
            return Err(CoreError::Invalid(format!(
                "server {id} has no BMC configured (PUT /api/v1/servers/{id}/bmc)"
            )));
        };
        let sealed = sealed
            .ok_or_else(|| CoreError::Invalid(format!("server {id} has no BMC password stored")))?;
        let password = self
            .sealer
            .open(id, &sealed)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let target = Target::new(
            &settings,
            &password,
            control.manager.settings().exchange_timeout,
        )
        .map_err(CoreError::Invalid)?;
        drop(password);
        let job = Job {
            server: id.to_string(),
            target,
            vendor: server.hardware.vendor.clone(),
            product: server.hardware.product.clone(),
            driver: settings.driver.clone(),
            operation,
            next_boot: server.power.next_boot,
        };
        // The operation runs in a task of its own: if the caller goes away (an HTTP client
        // hanging up), it still ends cleanly, closes its session and is recorded.
        let manager = Arc::clone(&control.manager);
        let (inv, events, key) = (
            Arc::clone(&self.inventory),
            self.events.clone(),
            id.to_string(),
        );
        let report = tokio::spawn(async move {
            let outcome = manager.run(job).await;
            record_power(inv, events, &key, &operation, outcome).await
        })
        .await
        .map_err(|e| CoreError::Internal(format!("the BMC operation task failed: {e}")))?;
        // Its BMC credentials were used, and the machine saw a step of its boot (a status
        // read, polled, is left out of both: it changes nothing and would bury the rest).
        if !matches!(operation, Operation::Status) {
            let (outcome, detail) = match &report {
                Ok(r) if r.event.ok => (Audited::Ok, r.event.operation.clone()),
                Ok(r) => (
                    Audited::Failed,
                    format!(
                        "{}: {}",
                        r.event.operation,
                        r.event.message.clone().unwrap_or_default()
                    ),
                ),
                Err(e) => (Audited::Failed, format!("{}: {e}", operation.describe())),
            };
            self.audit.record(
                "appliance",
                None,
                "bmc_credentials_used",
                Some(id),
                outcome,
                Some(detail),
            );
            if let Ok(r) = &report {
                self.timeline.witness(
                    Who::Uuid(id, &server.macs),
                    Step::Power {
                        operation: r.event.operation.clone(),
                        ok: r.event.ok,
                    },
                );
            }
        }
        report
    }
}

/// Records how an operation ended on its server and tells the subscribers.
async fn record_power(
    inventory: Arc<crate::inventory::Inventory>,
    events: tokio::sync::broadcast::Sender<ServerEvent>,
    id: &str,
    operation: &Operation,
    outcome: Outcome,
) -> Result<PowerReport> {
    let event = PowerEvent {
        at: now(),
        operation: operation.describe(),
        ok: outcome.result.is_ok(),
        reason: outcome.result.as_ref().err().map(|e| e.kind()),
        message: outcome.result.as_ref().err().map(|e| e.to_string()),
        attempts: outcome.attempts,
        took_ms: outcome.took.as_millis() as u64,
        driver: outcome.driver.clone(),
    };
    let key = id.to_string();
    let recorded = event.clone();
    let s = blocking(move || {
        Ok(inventory.update(&key, |s| {
            if let Some(state) = outcome.state {
                s.power.state = Some(state);
                s.power.checked_at = Some(recorded.at);
            }
            if outcome.driver.is_some() {
                s.power.driver = outcome.driver.clone();
            }
            s.power.push(recorded);
        })?)
    })
    .await?;
    // No subscriber is fine: nobody mirrors the inventory.
    let _ = events.send(ServerEvent::Changed(s.id.clone()));
    let _ = events.send(ServerEvent::Power(s.id.clone(), event.clone()));
    Ok(PowerReport {
        server: s.id.clone(),
        event,
        power: s.power,
    })
}
