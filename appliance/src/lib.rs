//! Arges: a bare-metal provisioning appliance.
//!
//! The crate is laid out in three floors (see `ARCHITECTURE.md`): protocol *edges*
//! ([`tftp`], [`http`]) that hold an `Arc<Core>`; the [`core`] facade, the only door the
//! edges use; and the *services* behind it ([`inventory`], [`ipxe`], [`config`], [`files`]).
//! The discovery [`agent`] shares only the [`registration`] wire types with the HTTP edge.

pub mod files;
pub mod ipxe;
pub mod metrics;
pub mod tftp;
