//! BMC power control: the transports the host owns ([`ipmi`] over [`rmcp`], and
//! [`redfish`]) and the generic IPMI chassis commands ([`chassis`]).
//!
//! Credentials stay in this module: the bmc-driver plugins (next step) will speak raw
//! IPMI commands or HTTP through the host, never holding a password.

pub mod chassis;
pub mod ipmi;
pub mod redfish;
pub mod rmcp;
