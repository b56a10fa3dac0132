//! What Arges's tests share, in one place (the way hickory-dns keeps its
//! `test-support` crate): every test binary (`tests/all`, `tests/kube`,
//! `tests/netboot`) and the `dev-control-plane` example use it.
//!
//! - [`appliance`]: the real `arges` binary on port 0 in a temp folder, and the clients
//!   that talk to it (curl, a plain socket, the real agent);
//! - [`fixtures`]: typed registrations;
//! - [`process`]: peers on `PATH`, commands inside a test's network namespace, free
//!   ports, bounded waits;
//! - [`ipmi_sim`]: OpenIPMI's BMC simulator;
//! - [`control_plane`] and [`cluster_api`]: etcd, kube-apiserver, and Cluster API's
//!   controllers, built from Go modules, with typed reads of the objects;
//! - [`node`]: a real node (kubelet, containerd, the scheduler and controller manager)
//!   that runs pods from imported images.

pub mod appliance;
pub mod cluster_api;
pub mod control_plane;
pub mod fixtures;
pub mod ipmi_sim;
pub mod node;
pub mod process;

pub use appliance::{
    ADMIN_TOKEN, Appliance, REG_TOKEN, curl, param, random_file, raw_http, runtime,
};
pub use fixtures::Registration;
pub use process::{
    bin, command_in, eventually, free_port, log_tail, repo, require, run, run_script, within,
};
