//! Kubernetes mode: the appliance's controller (kube, k8s-openapi).
//!
//! An edge like HTTP: it reaches the appliance only through [`Core`](crate::core::Core), and Kubernetes
//! becomes the shared state of every appliance in the fleet. [`resources`] holds the CRD
//! types; [`servers`] mirrors the inventory into `Server` resources and operators'
//! changes back; [`environments`] feeds cluster-defined Environments to the core;
//! [`server_classes`] decides class membership and keeps class counts; [`capi`] is the
//! Cluster API infrastructure provider (MetalCluster, MetalMachine); [`lease`] elects
//! one active replica per appliance identity; [`caches`] holds the watch-fed caches the
//! tasks share, so a steady fleet costs the apiserver its watches and leases only;
//! [`components`] assembles the provider as clusterctl installs it.
//!
//! Each appliance marks the Servers it discovered with its identity
//! (`metal.arges.dev/appliance`) and reconciles only those, so several racks share one
//! control plane without fighting. While the control plane is unreachable the boot path
//! goes on deciding from the local inventory; queued changes are pushed once it is back.

pub mod config;

#[cfg(feature = "kubernetes")]
pub mod caches;
#[cfg(feature = "kubernetes")]
pub mod capi;
#[cfg(feature = "kubernetes")]
pub mod components;
#[cfg(feature = "kubernetes")]
mod context;
#[cfg(feature = "kubernetes")]
pub mod environments;
#[cfg(feature = "kubernetes")]
pub mod lease;
#[cfg(feature = "kubernetes")]
pub mod resources;
#[cfg(feature = "kubernetes")]
mod reviews;
#[cfg(feature = "kubernetes")]
pub mod server_classes;
#[cfg(feature = "kubernetes")]
pub mod servers;
#[cfg(all(test, feature = "kubernetes"))]
pub mod testing;

#[cfg(feature = "kubernetes")]
pub use context::{Context, ControllerError, client, run, watch_until};
