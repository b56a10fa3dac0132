//! Why a BMC operation failed, as one closed set of names.
//!
//! A failure's kind travels far: from a transport or a driver, through the power
//! manager's metrics and log lines, into the Server's power history (the inventory, so
//! the serde names are stored and must not change), and on to the MetalMachine's
//! `PoweredOn` condition reason. One enum means a new kind or a rename is a compile error
//! in every place that turns it into words, never a silent `PowerFailed`.

use serde::{Deserialize, Serialize};

/// The kind of a failed BMC operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerFailure {
    /// The BMC refused the user name or password.
    Credentials,
    /// Nothing answers at the BMC's address.
    Unreachable,
    /// The BMC, or a driver step, did not answer in time.
    Timeout,
    /// The Redfish endpoint's certificate is not the one trusted.
    Tls,
    /// No IPMI cipher suite both sides speak.
    CipherSuite,
    /// The IPMI session broke.
    Session,
    /// The BMC answered a command with an error completion code.
    CompletionCode,
    /// The BMC answered something that is not the protocol.
    Protocol,
    /// A Redfish request got an HTTP error status.
    Status,
    /// A socket error.
    Io,
    /// The host refused a driver's request (an HTTP path outside the BMC's endpoint).
    Refused,
    /// No loaded driver fits the BMC, or the named one is not loaded.
    NoDriver,
    /// The driver says the BMC is not ready (POST); retried.
    NotReady,
    /// The driver cannot do this operation on this BMC.
    Unsupported,
    /// The driver reported a failure in its own words.
    DriverFailed,
    /// The BMC never showed the power state asked for.
    NotSettled,
    /// The next boot device read back differs from the one set.
    BootMismatch,
    /// Too many operations already wait for this BMC.
    QueueFull,
    /// The driver plugin trapped.
    Trap,
    /// The driver plugin ran out of memory.
    Memory,
    /// The driver plugin answered something malformed.
    Malformed,
    /// Every instance of the driver plugin is busy.
    Busy,
    /// The driver plugin failed otherwise (could not be instantiated, engine error).
    Plugin,
    /// A kind this build does not know (a record written by a newer one).
    #[serde(other)]
    Unknown,
}

impl PowerFailure {
    /// The stable name: metric label, log field, the Server's record.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerFailure::Credentials => "credentials",
            PowerFailure::Unreachable => "unreachable",
            PowerFailure::Timeout => "timeout",
            PowerFailure::Tls => "tls",
            PowerFailure::CipherSuite => "cipher_suite",
            PowerFailure::Session => "session",
            PowerFailure::CompletionCode => "completion_code",
            PowerFailure::Protocol => "protocol",
            PowerFailure::Status => "status",
            PowerFailure::Io => "io",
            PowerFailure::Refused => "refused",
            PowerFailure::NoDriver => "no_driver",
            PowerFailure::NotReady => "not_ready",
            PowerFailure::Unsupported => "unsupported",
            PowerFailure::DriverFailed => "driver_failed",
            PowerFailure::NotSettled => "not_settled",
            PowerFailure::BootMismatch => "boot_mismatch",
            PowerFailure::QueueFull => "queue_full",
            PowerFailure::Trap => "trap",
            PowerFailure::Memory => "memory",
            PowerFailure::Malformed => "malformed",
            PowerFailure::Busy => "busy",
            PowerFailure::Plugin => "plugin",
            PowerFailure::Unknown => "unknown",
        }
    }

    /// The `PoweredOn` condition reason of a MetalMachine whose power step failed so:
    /// the ones an operator acts on differently have their own, the rest are
    /// `PowerFailed`.
    pub fn condition_reason(self) -> &'static str {
        match self {
            PowerFailure::Credentials => "PowerFailedCredentials",
            PowerFailure::Unreachable => "PowerFailedUnreachable",
            PowerFailure::Timeout => "PowerFailedTimeout",
            PowerFailure::Tls => "PowerFailedTLS",
            PowerFailure::NoDriver => "PowerFailedNoDriver",
            PowerFailure::BootMismatch => "PowerFailedBootMismatch",
            PowerFailure::NotSettled => "PowerFailedNotSettled",
            PowerFailure::CipherSuite
            | PowerFailure::Session
            | PowerFailure::CompletionCode
            | PowerFailure::Protocol
            | PowerFailure::Status
            | PowerFailure::Io
            | PowerFailure::Refused
            | PowerFailure::NotReady
            | PowerFailure::Unsupported
            | PowerFailure::DriverFailed
            | PowerFailure::QueueFull
            | PowerFailure::Trap
            | PowerFailure::Memory
            | PowerFailure::Malformed
            | PowerFailure::Busy
            | PowerFailure::Plugin
            | PowerFailure::Unknown => "PowerFailed",
        }
    }

    /// Whether a transport failure of this kind may pass if tried again.
    pub fn transient(self) -> bool {
        matches!(
            self,
            PowerFailure::Timeout
                | PowerFailure::Unreachable
                | PowerFailure::Io
                | PowerFailure::Session
        )
    }
}

impl std::fmt::Display for PowerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_names_are_the_stable_names() {
        // The inventory stores these names: what was written must read back the same.
        for f in [
            PowerFailure::Credentials,
            PowerFailure::CipherSuite,
            PowerFailure::NoDriver,
            PowerFailure::QueueFull,
            PowerFailure::Unknown,
        ] {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<PowerFailure>(&json).unwrap(), f);
        }
        let newer: PowerFailure = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(newer, PowerFailure::Unknown);
    }

    #[test]
    fn condition_reasons() {
        assert_eq!(
            PowerFailure::Credentials.condition_reason(),
            "PowerFailedCredentials"
        );
        assert_eq!(PowerFailure::Tls.condition_reason(), "PowerFailedTLS");
        assert_eq!(PowerFailure::Busy.condition_reason(), "PowerFailed");
    }
}
