//! What one MetalMachine reconcile found out: the conditions it sets, the events worth
//! publishing, and why a step could not go on ([`Blocked`]).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;

use super::super::{ReconcileError, set_condition};
use crate::controller::resources::MetalMachine;

/// Why a step cannot go on yet: the `Ready` condition's reason and message.
#[derive(Debug)]
pub(super) struct Blocked {
    pub reason: &'static str,
    pub message: String,
    /// A failure an operator should hear of (a Warning event), not a wait.
    pub warning: bool,
    /// When to look again; `None`: the watches will say (and a slow resync).
    pub retry: Option<Duration>,
}

impl Blocked {
    /// Waiting for something that will come by itself.
    pub fn waiting(reason: &'static str, message: impl Into<String>) -> Self {
        Blocked {
            reason,
            message: message.into(),
            warning: false,
            retry: None,
        }
    }

    /// Stuck until someone fixes something; looked at again after `retry`.
    pub fn failed(reason: &'static str, message: impl Into<String>, retry: Duration) -> Self {
        Blocked {
            reason,
            message: message.into(),
            warning: true,
            retry: Some(retry),
        }
    }

    /// Looked at again after `after` rather than when a watch says.
    pub fn retry(mut self, after: Duration) -> Self {
        self.retry = Some(after);
        self
    }
}

/// A step's failure: blocked with a reason, or an error to retry with backoff.
#[derive(Debug)]
pub(super) enum Step {
    Blocked(Blocked),
    Error(ReconcileError),
}

impl<E: Into<ReconcileError>> From<E> for Step {
    fn from(e: E) -> Self {
        Step::Error(e.into())
    }
}

impl From<Blocked> for Step {
    fn from(b: Blocked) -> Self {
        Step::Blocked(b)
    }
}

/// An event to publish on the MetalMachine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// What one reconcile worked out for the status.
#[derive(Debug)]
pub(super) struct Report {
    pub conditions: Vec<Condition>,
    /// Events to publish (reason changes only).
    pub events: Vec<Note>,
    generation: Option<i64>,
}

impl Report {
    pub fn new(mm: &MetalMachine) -> Self {
        Report {
            conditions: mm.status.clone().unwrap_or_default().conditions,
            events: Vec::new(),
            generation: mm.meta().generation,
        }
    }

    /// Condition `type_` holds, for `reason`.
    pub fn done(&mut self, type_: &str, reason: &str, message: &str) {
        self.set(type_, true, reason, message, false);
    }

    /// Condition `type_` does not hold yet, for `reason`: a wait, not a failure.
    pub fn pending(&mut self, type_: &str, reason: &str, message: &str) {
        self.set(type_, false, reason, message, false);
    }

    /// Condition `type_` failed, for `reason`: a Warning event when the reason is new.
    pub fn failed(&mut self, type_: &str, reason: &str, message: &str) {
        self.set(type_, false, reason, message, true);
    }

    /// Condition `type_` as `ok`, for `reason`, with no event (a state, not news).
    /// Whether its status or reason changed.
    pub fn quiet(&mut self, type_: &str, ok: bool, reason: &str, message: &str) -> bool {
        set_condition(
            &mut self.conditions,
            type_,
            ok,
            reason,
            message,
            self.generation,
        )
    }

    /// `Ready` is false because of `b`. Whether that is news (its reason changed).
    pub fn blocked(&mut self, b: &Blocked) -> bool {
        let before = self.events.len();
        self.set("Ready", false, b.reason, &b.message, b.warning);
        self.events.len() > before
    }

    /// Sets a condition; an event when its reason changed (for `Ready`, only warnings:
    /// its waits are visible in the condition and would flood the events).
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: &str, warning: bool) {
        if self.quiet(type_, ok, reason, message) && (warning || type_ != "Ready") {
            self.events.push(Note {
                warning,
                reason: reason.to_string(),
                message: message.to_string(),
            });
        }
    }

    /// The condition `type_` as `status/reason`, for tests and log lines.
    #[cfg(test)]
    pub fn condition(&self, type_: &str) -> Option<String> {
        self.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| format!("{}/{}", c.status, c.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_follow_reason_changes_and_ready_waits_stay_quiet() {
        let mut r = Report::new(&MetalMachine::new("m", Default::default()));
        r.done("ServerClaimed", "Claimed", "claimed Server a");
        r.done("ServerClaimed", "Claimed", "claimed Server a");
        assert_eq!(r.events.len(), 1, "the same reason again is no news");
        assert!(!r.blocked(&Blocked::waiting("WaitingForMachine", "no Machine")));
        assert!(r.events.len() == 1, "a wait on Ready is no event");
        assert!(r.blocked(&Blocked::failed("NoBMC", "no BMC", Duration::from_secs(1))));
        assert_eq!(
            r.events.last(),
            Some(&Note {
                warning: true,
                reason: "NoBMC".into(),
                message: "no BMC".into()
            })
        );
        assert_eq!(r.condition("Ready").as_deref(), Some("False/NoBMC"));
        r.failed("PoweredOn", "PowerFailedTimeout", "slow");
        assert!(r.events.last().is_some_and(|n| n.warning));
        r.pending("Installed", "Installing", "waiting");
        assert_eq!(
            r.condition("Installed").as_deref(),
            Some("False/Installing")
        );
    }
}
