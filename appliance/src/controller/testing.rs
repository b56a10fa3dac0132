//! The seam under the controller: a [`Context`] whose client talks to a scripted
//! apiserver in the test itself (tower-test's mock service, the way kube-rs's
//! controller-rs tests its reconcilers), over a [`Core::test`] core. A test runs a
//! reconcile in a task and answers each request it makes, in order: what the reconciler
//! asks, what it writes, and what it does when the apiserver says 404 or 409 are all
//! checked without a control plane. Events are answered (echoed) and kept on the side.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Request, Response};
use kube::Client;
use kube::api::DynamicObject;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use super::Context;
use super::caches::{CacheWriters, Caches, CapiStores};
use super::capi;
use crate::core::Core;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;

/// How long a test waits for the reconciler's next request before it fails.
const PATIENCE: Duration = Duration::from_secs(5);

impl Context {
    /// A context for appliance identity `rack-1` over `core`, and the apiserver its
    /// client talks to.
    pub fn test(core: Core) -> (Arc<Context>, ApiServer) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "arges-test".into(),
                instance: None,
            },
        );
        let (caches, writers) = Caches::new();
        // The fleet view built, and showing no other rack: this appliance's turn always.
        caches.free.send_replace(Some(Default::default()));
        // Leading, with no Machine or Cluster yet (a test fills them).
        let mut capi_machines = Writer::new(capi::capi_resource("Machine", "machines"));
        let mut capi_clusters = Writer::new(capi::capi_resource("Cluster", "clusters"));
        fill(&mut capi_machines, &[], capi::project);
        fill(&mut capi_clusters, &[], capi::project);
        caches.capi.send_replace(Some(CapiStores {
            machines: capi_machines.as_reader(),
            clusters: capi_clusters.as_reader(),
        }));
        let ctx = Context {
            client,
            core: Arc::new(core),
            identity: "rack-1".into(),
            namespace: "arges-system".into(),
            watch_namespace: None,
            field_manager: "arges-rack-1".into(),
            wipe_on_release: true,
            control_plane: true,
            caches,
            recorder,
            warned: Mutex::new(HashSet::new()),
        };
        (
            Arc::new(ctx),
            ApiServer {
                handle,
                events: Vec::new(),
                caches: writers,
                capi_machines,
                capi_clusters,
            },
        )
    }
}

/// The scripted apiserver.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    /// Events published so far: (type, reason, note).
    pub events: Vec<(String, String, String)>,
    /// What the watches would have put in the context's caches.
    caches: CacheWriters,
    capi_machines: Writer<DynamicObject>,
    capi_clusters: Writer<DynamicObject>,
}

/// One request the reconciler made, waiting for its answer.
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The request body as JSON (`Null` when empty).
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// The next request that is not an event (events are answered on the way).
    pub async fn next(&mut self) -> Call {
        loop {
            let (req, send) = tokio::time::timeout(PATIENCE, self.handle.next_request())
                .await
                .expect("the reconciler made no further request")
                .expect("the client is gone");
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let bytes = req.into_body().collect_bytes().await.expect("request body");
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON request body")
            };
            if path.starts_with("/apis/events.k8s.io/v1/") {
                let field = |k: &str| body[k].as_str().unwrap_or_default().to_string();
                self.events
                    .push((field("type"), field("reason"), field("note")));
                send.send_response(ok(&body));
                continue;
            }
            return Call {
                method,
                path,
                query,
                body,
                send,
            };
        }
    }

    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: &str, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (call.method.as_str(), call.path.as_str()),
            (method, path),
            "unexpected request (body {})",
            call.body
        );
        call
    }

    /// Answers events until `task` (the reconcile) ends, and its result; any other
    /// request is one the test did not expect.
    pub async fn until_done<T>(&mut self, task: tokio::task::JoinHandle<T>) -> T {
        tokio::pin!(task);
        tokio::select! {
            r = &mut task => r.expect("the reconcile task"),
            call = self.next() => panic!(
                "unexpected request {} {} (body {})",
                call.method, call.path, call.body
            ),
        }
    }

    /// The caches as a first listing would fill them: these Servers of this appliance
    /// and these ServerClasses (JSON objects).
    pub fn cached(&mut self, servers: &[Value], classes: &[Value]) {
        fill(&mut self.caches.servers, servers, |_| {});
        fill(&mut self.caches.classes, classes, |_| {});
    }

    /// Cluster API's Machines and Clusters as the leader's watches would keep them
    /// (projected: a step that reads a field the projection drops fails here).
    pub fn cached_capi(&mut self, machines: &[Value], clusters: &[Value]) {
        fill(&mut self.capi_machines, machines, capi::project);
        fill(&mut self.capi_clusters, clusters, capi::project);
    }

    /// Whether an event with `reason` was published.
    pub fn published(&self, reason: &str) -> bool {
        self.events.iter().any(|(_, r, _)| r == reason)
    }
}

impl Call {
    /// Answers 200 with `object`.
    pub fn reply(self, object: &Value) {
        self.send.send_response(ok(object));
    }

    /// Answers 200 with the request's own body (a merge patch's body stands in for the
    /// object the apiserver would return).
    pub fn echo(self) {
        let body = self.body.clone();
        self.reply(&body);
    }

    /// Answers 404 Not Found.
    pub fn not_found(self) {
        self.status(404, "NotFound", "not found");
    }

    /// Answers 409 Conflict, as for a stale resourceVersion.
    pub fn conflict(self) {
        self.status(
            409,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }

    fn status(self, code: u16, reason: &str, message: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        });
        let response = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&status).unwrap_or_default()))
            .expect("a response");
        self.send.send_response(response);
    }
}

/// A first listing of `objects` into `writer`, each changed by `kept` as the watch
/// would.
fn fill<K>(writer: &mut Writer<K>, objects: &[Value], kept: fn(&mut K))
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        let mut object: K = serde_json::from_value(o.clone()).expect("a cached object");
        kept(&mut object);
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

fn ok(object: &Value) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(object).unwrap_or_default()))
        .expect("a response")
}
