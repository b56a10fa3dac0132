//! Watch-fed caches the controller's tasks share, so that steady state costs the
//! apiserver nothing but the watches themselves (controller-runtime's informer model, in
//! kube-runtime's reflectors):
//!
//! - this appliance's own Servers (label-selected), fed by the pull watch every replica
//!   runs anyway: claims pick free servers here instead of listing them;
//! - every ServerClass: claims read their class here, and class counts are recomputed
//!   when one changes ([`Caches::classes_changed`]);
//! - the racks that hold usable servers ([`Caches::racks`]), from the class-count watch
//!   of every Server: MetalClusters publish them as failure domains;
//! - the free servers of each class in each rack ([`Caches::free`]), from the same
//!   watch: MetalMachines are placed by it (`capi/machines/placement.rs`);
//! - Cluster API's Machines and Clusters ([`Caches::capi`]), leader only, each kept as
//!   the few fields the provider reads: the MetalMachine and MetalCluster reconcilers
//!   read their owners here instead of asking the apiserver each time.
//!
//! A cache may lag the cluster by a watch event. What must be exact stays a
//! resourceVersion precondition on the write (a claim), and claims this process has just
//! taken are remembered until the watch shows them ([`Caches::claimed`]), so a reconcile
//! repeated in that gap finds its own claim instead of taking a second server.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::DynamicObject;
use kube::runtime::reflector::{self, Lookup, ObjectRef, Store, store::Writer};
use tokio::sync::{Notify, watch};

use super::capi::machines::FirstSeen;
use super::resources::{Server as ServerResource, ServerClass};

/// How long a task waits for a cache's first listing before it says so and retries.
pub const READY_WITHIN: Duration = Duration::from_secs(10);

/// The controller's shared caches (readers); the watches hold the writers.
pub struct Caches {
    /// This appliance's Servers.
    pub servers: Store<ServerResource>,
    /// Every ServerClass.
    pub classes: Store<ServerClass>,
    /// Signalled on every ServerClass change (the class-count task waits on it).
    pub classes_changed: Notify,
    /// Racks holding accepted, uncordoned servers, and whether each may run control-plane
    /// machines; `None` until the watch of every Server has listed (leader only).
    pub racks: watch::Sender<Option<Racks>>,
    /// Free servers by class and rack; `None` until the watch of every Server has listed
    /// (leader only).
    pub free: watch::Sender<Option<Arc<FreeServers>>>,
    /// When each MetalMachine waiting for its rack's turn was first seen.
    pub first_seen: FirstSeen,
    /// Cluster API's Machines and Clusters; `None` while this appliance does not lead.
    pub capi: watch::Sender<Option<CapiStores>>,
    /// Claims taken by this process: the claim's uid to the Server's name.
    claims: Mutex<HashMap<String, String>>,
}

/// Rack (appliance identity) to control-plane eligibility.
pub type Racks = BTreeMap<String, bool>;

/// ServerClass to rack to the number of its servers free to claim there (racks without
/// one are left out).
pub type FreeServers = BTreeMap<String, BTreeMap<String, u32>>;

/// Whether stores `a` and `b` have both had their first listing within [`READY_WITHIN`].
async fn both_listed<A, B>(a: &Store<A>, b: &Store<B>) -> bool
where
    A: Lookup + Clone + 'static,
    A::DynamicType: Eq + Hash + Clone,
    B: Lookup + Clone + 'static,
    B::DynamicType: Eq + Hash + Clone,
{
    let both = async { a.wait_until_ready().await.is_ok() && b.wait_until_ready().await.is_ok() };
    tokio::time::timeout(READY_WITHIN, both)
        .await
        .unwrap_or(false)
}

/// Cluster API objects the provider reads, projected (see `capi::project`).
#[derive(Clone)]
pub struct CapiStores {
    pub machines: Store<DynamicObject>,
    pub clusters: Store<DynamicObject>,
}

/// The writers of [`Caches`], handed to the watches that feed them.
pub struct CacheWriters {
    pub servers: Writer<ServerResource>,
    pub classes: Writer<ServerClass>,
}

impl Caches {
    /// Empty caches and their writers.
    pub fn new() -> (Caches, CacheWriters) {
        let (servers, servers_writer) = reflector::store();
        let (classes, classes_writer) = reflector::store();
        (
            Caches {
                servers,
                classes,
                classes_changed: Notify::new(),
                racks: watch::Sender::new(None),
                free: watch::Sender::new(None),
                first_seen: FirstSeen::default(),
                capi: watch::Sender::new(None),
                claims: Mutex::new(HashMap::new()),
            },
            CacheWriters {
                servers: servers_writer,
                classes: classes_writer,
            },
        )
    }

    /// Whether both caches have had their first listing within [`READY_WITHIN`].
    pub async fn ready(&self) -> bool {
        both_listed(&self.servers, &self.classes).await
    }

    /// Cluster API's Machines and Clusters once both have had their first listing
    /// within [`READY_WITHIN`]; `None` if not (or not leading).
    pub async fn capi(&self) -> Option<CapiStores> {
        let stores = self.capi.borrow().clone()?;
        both_listed(&stores.machines, &stores.clusters)
            .await
            .then_some(stores)
    }

    /// The ServerClass `name`, as last seen.
    pub fn class(&self, name: &str) -> Option<std::sync::Arc<ServerClass>> {
        self.classes.get(&ObjectRef::new(name))
    }

    /// Remembers that claim `uid` took Server `server`.
    pub fn claimed(&self, uid: &str, server: &str) {
        self.lock_claims()
            .insert(uid.to_string(), server.to_string());
    }

    /// The Server claim `uid` took in this process, if it is not given back.
    pub fn claim(&self, uid: &str) -> Option<String> {
        self.lock_claims().get(uid).cloned()
    }

    /// Forgets claim `uid` (released, or seen by the watch).
    pub fn forget_claim(&self, uid: &str) {
        self.lock_claims().remove(uid);
    }

    fn lock_claims(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }
}
