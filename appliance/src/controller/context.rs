//! What the controller's tasks share ([`Context`]), the Kubernetes client, and the
//! leader loop that runs them ([`run`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::caches::Caches;
use super::config::KubernetesConfig;
use super::{capi, environments, lease, server_classes, servers};
use crate::core::Core;
use crate::metrics::Metrics;

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure the in-cluster client: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// How long the leader's tasks get to stop once leadership ends.
const LEADER_TEARDOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// What the controller's tasks share.
pub struct Context {
    pub client: Client,
    pub core: Arc<Core>,
    pub identity: String,
    pub namespace: String,
    /// Cluster API objects are watched in this namespace only (`None`: every one).
    pub watch_namespace: Option<String>,
    /// Server-side apply field manager: one per appliance identity.
    pub field_manager: String,
    /// Servers released by their MetalMachine are wiped (else powered off).
    pub wipe_on_release: bool,
    /// This rack may run control-plane machines.
    pub control_plane: bool,
    /// Watch-fed caches of this appliance's Servers and of ServerClasses.
    pub caches: Caches,
    pub(super) recorder: Recorder,
    /// (object uid, reason) pairs already warned about, so a resync does not repeat them.
    pub(super) warned: Mutex<HashSet<(String, &'static str)>>,
}

impl Context {
    /// The API of a Cluster API kind, over the watched namespace (or every one).
    pub fn capi_api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.watch_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// The appliance's metrics.
    pub fn metrics(&self) -> &Metrics {
        self.core.metrics()
    }

    /// A Warning event on `obj`, once per object and reason in this process.
    pub async fn warn_once<K>(&self, obj: &K, reason: &'static str, note: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        let key = (obj.uid().unwrap_or_default(), reason);
        if !self
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key)
        {
            return;
        }
        tracing::warn!(object = %obj.name_any(), reason, note, "warning event");
        self.publish(&obj.object_ref(&()), false, reason, "Reconcile", note)
            .await;
    }

    /// An event on the object `to`: Normal, or Warning when `warning`.
    pub async fn publish(
        &self,
        to: &k8s_openapi::api::core::v1::ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, to).await {
            tracing::warn!(error = %e, "cannot publish an event");
        }
    }
}

/// A watch of `api` that backs off while the apiserver is away, re-lists after expiry,
/// and ends when `cancel` fires.
pub fn watch_until<K>(
    api: Api<K>,
    config: kube::runtime::watcher::Config,
    cancel: CancellationToken,
) -> futures_util::stream::BoxStream<
    'static,
    kube::runtime::watcher::Result<kube::runtime::watcher::Event<K>>,
>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    use futures_util::StreamExt;
    use kube::runtime::WatchStreamExt;
    kube::runtime::watcher(api, config)
        .default_backoff()
        .take_until(cancel.cancelled_owned())
        .boxed()
}

/// The client for `config`: its kubeconfig, or the pod's service account.
pub async fn client(config: &KubernetesConfig) -> Result<Client, ControllerError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ControllerError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| ControllerError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::incluster().map_err(ControllerError::InCluster)?,
    };
    Client::try_from(kube_config).map_err(ControllerError::Client)
}

/// Runs the controller until `cancel` fires. Never returns an error once started:
/// every failure past this point is logged, counted and retried.
pub async fn run(
    core: Arc<Core>,
    config: KubernetesConfig,
    cancel: CancellationToken,
) -> Result<(), ControllerError> {
    let client = client(&config).await?;
    let holder = format!("{}-{}", config.identity, &crate::random_token()[..8]);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "arges-appliance".into(),
            instance: Some(holder.clone()),
        },
    );
    core.set_reviewer(Arc::new(super::reviews::KubeReviewer {
        client: client.clone(),
    }));
    let (caches, writers) = Caches::new();
    let ctx = Arc::new(Context {
        client: client.clone(),
        core,
        identity: config.identity.clone(),
        namespace: config.namespace.clone(),
        watch_namespace: config.watch_namespace.clone(),
        field_manager: format!("arges-{}", config.identity),
        wipe_on_release: config.wipe_on_release,
        control_plane: config.control_plane,
        caches,
        recorder,
        warned: Mutex::new(HashSet::new()),
    });
    tracing::info!(
        identity = %ctx.identity,
        namespace = %ctx.namespace,
        watch_namespace = ctx.watch_namespace.as_deref().unwrap_or("(every namespace)"),
        "Kubernetes controller starting"
    );
    // Every replica keeps its local copy and its caches current; only the leader writes
    // to the cluster.
    let pull = tokio::spawn(servers::pull(
        Arc::clone(&ctx),
        writers.servers,
        cancel.clone(),
    ));
    let classes_watch = tokio::spawn(server_classes::watch(
        Arc::clone(&ctx),
        writers.classes,
        cancel.clone(),
    ));
    let envs = tokio::spawn(environments::watch(Arc::clone(&ctx), cancel.clone()));
    let elector = lease::Elector::new(
        Api::<Lease>::namespaced(client, &ctx.namespace),
        format!("arges-{}", ctx.identity),
        holder,
    );
    while elector.acquire(&cancel).await {
        ctx.metrics().controller_leader.set(1);
        let leading = cancel.child_token();
        let push = tokio::spawn(servers::push(Arc::clone(&ctx), leading.clone()));
        let classes = tokio::spawn(server_classes::count(Arc::clone(&ctx), leading.clone()));
        let capi = tokio::spawn(capi::run(Arc::clone(&ctx), leading.clone()));
        elector.hold(&leading).await;
        leading.cancel();
        let tasks = [push, classes, capi];
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        // Each task stops on the token; one that does not (kube-runtime's controllers,
        // stopped in the moment they start, have been seen to linger) is aborted: every
        // step is idempotent and the inventory is the state, so nothing is lost.
        let stopped = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(LEADER_TEARDOWN, stopped)
            .await
            .is_err()
        {
            let lingering: Vec<&str> = ["push", "class counts", "cluster api"]
                .into_iter()
                .zip(&aborts)
                .filter(|(_, a)| !a.is_finished())
                .map(|(name, _)| name)
                .collect();
            tracing::warn!(after = ?LEADER_TEARDOWN, ?lingering, "the leader's tasks did not stop; aborted");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
        ctx.metrics().controller_leader.set(0);
        if cancel.is_cancelled() {
            elector.release().await;
        }
    }
    let _ = pull.await;
    let _ = classes_watch.await;
    let _ = envs.await;
    Ok(())
}
