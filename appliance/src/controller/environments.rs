//! Environments defined in the cluster, fed to the core beside appliance.toml's.
//!
//! A watch keeps the whole set; each change hands the core a fresh map. An Environment
//! names files inside the appliance's assets folder (a path that would leave it is
//! refused), its arguments form the kernel command line template, and a pinned sha256 is
//! checked before the environment is used, as at config load.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::resources::Environment as EnvironmentResource;
use crate::config::environments::cmdline_template;
use crate::config::{Environment, check_sha256};

/// The boot environment an Environment resource describes, or why it cannot be used.
pub fn convert(
    r: &EnvironmentResource,
    assets_dir: &std::path::Path,
) -> Result<Environment, String> {
    let name = r.name_any();
    let mut files = Vec::new();
    for (what, path, sha) in std::iter::once(("kernel", &r.spec.kernel.path, &r.spec.kernel.sha256))
        .chain(
            r.spec
                .initrds
                .iter()
                .map(|i| ("initrd", &i.path, &i.sha256)),
        )
    {
        let rel = crate::files::sanitize(path)
            .map_err(|_| format!("{what} path {path:?} leaves the assets folder"))?;
        let full = assets_dir.join(rel);
        if let Some(want) = sha {
            check_sha256(&full, want).map_err(|e| format!("{what}: {e}"))?;
        }
        files.push(full);
    }
    let cmdline = cmdline_template(
        &format!("Environment {name} spec.kernel.args"),
        &r.spec.kernel.args.join(" "),
    )
    .map_err(|e| e.to_string())?;
    let kernel = files.remove(0);
    Ok(Environment {
        name,
        kernel,
        initrds: files,
        cmdline,
    })
}

/// Watches Environments until `cancel` fires.
pub async fn watch(ctx: Arc<Context>, cancel: CancellationToken) {
    let api: Api<EnvironmentResource> = Api::all(ctx.client.clone());
    let mut stream = super::watch_until(api, watcher::Config::default(), cancel);
    let mut known: BTreeMap<String, EnvironmentResource> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, EnvironmentResource>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(e)) => {
                listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(e.name_any(), e);
                continue;
            }
            Ok(watcher::Event::InitDone) => known = listing.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(e)) => {
                known.insert(e.name_any(), e);
            }
            Ok(watcher::Event::Delete(e)) => {
                known.remove(&e.name_any());
            }
            Err(e) => {
                tracing::warn!(error = %e, "Environment watch failed; retrying");
                continue;
            }
        }
        let assets = ctx.core.config().assets_dir.clone();
        let resources: Vec<EnvironmentResource> = known.values().cloned().collect();
        // sha256 checks read whole files: off the reactor.
        let converted = tokio::task::spawn_blocking(move || {
            resources
                .iter()
                .map(|r| (r.name_any(), convert(r, &assets)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut envs = BTreeMap::new();
        for (name, result) in converted {
            match result {
                Ok(env) => {
                    envs.insert(name, env);
                }
                Err(why) => {
                    tracing::warn!(environment = %name, reason = %why, "Environment not usable")
                }
            }
        }
        tracing::info!(count = envs.len(), "cluster environments updated");
        ctx.core.set_cluster_environments(envs);
    }
}
