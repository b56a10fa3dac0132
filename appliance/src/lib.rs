//! Arges: a bare-metal provisioning appliance.
//!
//! The crate is laid out in three floors (see `ARCHITECTURE.md`): protocol *edges*
//! ([`tftp`], [`http`], [`dhcp`], and the Kubernetes `controller`) that hold an `Arc<Core>`; the [`core`] facade, the only door the
//! edges use; and the *services* behind it ([`inventory`], [`ipxe`], [`config`], [`files`],
//! [`sealing`]).
//! The discovery [`agent`] shares only the [`registration`] wire types with the HTTP edge.

pub mod agent;
pub mod app;
pub mod audit;
pub mod bmc;
pub mod config;
pub mod controller;
pub mod core;
pub mod dhcp;
pub mod doctor;
pub mod files;
pub mod http;
pub mod inventory;
pub mod ipxe;
pub mod limits;
pub mod loadtest;
pub mod metrics;
pub mod plugins;
pub mod registration;
pub mod sealing;
pub mod shutdown;
pub mod tftp;
pub mod timeline;
pub mod tls;

/// The hex sha256 of a secret: how the inventory keeps the secrets it hands out.
pub fn secret_hash(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// A fresh random token: 32 bytes from the OS, hex-encoded.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    // The OS RNG failing is unrecoverable for anything security-related.
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    hex::encode(b)
}
