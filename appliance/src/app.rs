//! Wires the appliance together: folders, tokens, inventory, core, sockets, servers.
//!
//! Sockets are bound here (so errors name the address) and handed to the servers already
//! bound. One stop token stops everything from taking new work; HTTP connections and
//! TFTP transfers in flight then drain within `drain_secs` ([`crate::shutdown`]). With
//! `ready_file`, the bound addresses are written as JSON once serving, which is how
//! tests using port 0 find them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bmc::manager::PowerManager;
use crate::config::{Config, DhcpMode};
use crate::core::Core;
use crate::dhcp::{self, DhcpServer};
use crate::files::FileRoot;
use crate::http::{self, HttpContext};
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::sealing::Sealer;
use crate::shutdown::Shutdown;
use crate::tftp::TftpServer;

/// Addresses actually bound, as written to the ready file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bound {
    pub http: Vec<SocketAddr>,
    /// HTTPS listeners for machines and agents.
    #[serde(default)]
    pub https: Vec<SocketAddr>,
    /// The admin API's own HTTPS listeners.
    #[serde(default)]
    pub admin: Vec<SocketAddr>,
    pub tftp: Vec<SocketAddr>,
    /// proxyDHCP sockets: the DHCP port's, then the PXE port's.
    #[serde(default)]
    pub dhcp: Vec<SocketAddr>,
}

fn bind_hint(e: &std::io::Error, addr: &SocketAddr) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        }
        std::io::ErrorKind::AddrInUse => " (another program is using it)",
        std::io::ErrorKind::AddrNotAvailable => " (no interface has this address)",
        _ => "",
    }
}

/// The HTTPS certificate: the config's, or one made on first start for the appliance's
/// addresses and names.
fn server_tls(config: &Config) -> Result<crate::tls::ServerTls> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let listens = config
        .http
        .listen
        .iter()
        .chain(&config.http.tls_listen)
        .chain(&config.http.admin_listen);
    for a in listens.filter(|a| !a.ip().is_unspecified()) {
        names.push(a.ip().to_string());
    }
    names.extend(config.http.names.iter().cloned());
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_ascii_lowercase());
    }
    names.sort();
    names.dedup();
    names.retain(|n| !n.is_empty());
    crate::tls::ServerTls::load_or_generate(
        &config.tls_cert,
        &config.tls_key,
        config.tls_generate,
        &names,
    )
    .context("cannot set up HTTPS")
}

/// What the plugin host provides: the boot policy (its chain) and the BMC drivers.
type Plugged = (
    Option<Arc<dyn crate::core::BootPolicy>>,
    Arc<dyn crate::bmc::driver::Drivers>,
);

/// Starts the plugin host and its folder watcher.
#[cfg(feature = "plugins")]
fn start_plugins(
    config: &Config,
    metrics: &Arc<Metrics>,
    tasks: &mut JoinSet<std::io::Result<()>>,
    cancel: &CancellationToken,
) -> Plugged {
    use crate::core::DefaultPolicy;
    use crate::plugins::PluginHost;
    match PluginHost::new(config.plugins.clone(), Arc::clone(metrics)) {
        Ok(host) => {
            let chain = host.chain(DefaultPolicy {
                config: config.policy.clone(),
            });
            let cancel = cancel.clone();
            let watched = Arc::clone(&host);
            tasks.spawn(async move {
                // A watcher failure is not fatal: the plugins loaded so far keep serving.
                if let Err(e) = watched.watch(cancel.clone()).await {
                    tracing::error!(error = %e, "plugin watcher stopped");
                    cancel.cancelled().await;
                }
                Ok(())
            });
            (Some(Arc::new(chain)), host)
        }
        Err(e) => {
            tracing::error!(error = %e, "plugin host unavailable; using the built-in boot policy and no BMC drivers");
            (None, Arc::new(crate::bmc::driver::NoDrivers))
        }
    }
}

#[cfg(not(feature = "plugins"))]
fn start_plugins(
    _config: &Config,
    _metrics: &Arc<Metrics>,
    _tasks: &mut JoinSet<std::io::Result<()>>,
    _cancel: &CancellationToken,
) -> Plugged {
    (None, Arc::new(crate::bmc::driver::NoDrivers))
}

/// Starts the Kubernetes controller when the config turns Kubernetes mode on.
#[cfg(feature = "kubernetes")]
fn start_controller(
    config: &Config,
    core: &Arc<Core>,
    tasks: &mut JoinSet<std::io::Result<()>>,
    cancel: &CancellationToken,
) {
    let Some(k) = config.kubernetes.clone() else {
        return;
    };
    let core = Arc::clone(core);
    let cancel = cancel.clone();
    tasks.spawn(async move {
        if let Err(e) = crate::controller::run(core, k, cancel.clone()).await {
            // The boot path does not need the cluster: keep serving from the inventory.
            tracing::error!(error = %e, "the Kubernetes controller cannot start; serving from the local inventory");
            cancel.cancelled().await;
        }
        Ok(())
    });
}

#[cfg(not(feature = "kubernetes"))]
fn start_controller(
    config: &Config,
    _core: &Arc<Core>,
    _tasks: &mut JoinSet<std::io::Result<()>>,
    _cancel: &CancellationToken,
) {
    if config.kubernetes.is_some() {
        tracing::error!("this build has no Kubernetes mode (feature `kubernetes`)");
    }
}

/// Runs the appliance until `cancel` fires (then drains what is in flight) or a server
/// fails.
pub async fn run(
    config: Config,
    ready_file: Option<PathBuf>,
    cancel: CancellationToken,
) -> Result<()> {
    let shutdown = Shutdown::with_stop(cancel.clone());
    for (what, dir) in [
        ("data", &config.data_dir),
        ("TFTP root", &config.tftp_root),
        ("assets", &config.assets_dir),
        ("plugins", &config.plugins.dir),
    ] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the {what} folder {}", dir.display()))?;
    }
    let registration_token = config
        .registration_token
        .resolve()
        .context("cannot read the registration token")?;
    let admin_token = config
        .admin_token
        .resolve()
        .context("cannot read the admin token")?;
    anyhow::ensure!(
        !crate::core::secret_eq(&admin_token, &registration_token),
        "the admin token and the registration token are the same: every machine's agent would hold the admin API's key; give them different values"
    );
    let db_path = config.data_dir.join("inventory.redb");
    let inventory = {
        let p = db_path.clone();
        tokio::task::spawn_blocking(move || Inventory::open(&p))
            .await?
            .with_context(|| format!("cannot open the inventory {}", db_path.display()))?
    };
    let metrics = Arc::new(Metrics::new());
    let config = Arc::new(config);
    let mut tasks = JoinSet::new();
    let (policy, drivers) = start_plugins(&config, &metrics, &mut tasks, &cancel);
    let sealer = {
        let key = config.bmc.key_file.clone();
        Arc::new(tokio::task::spawn_blocking(move || Sealer::open_or_create(&key)).await??)
    };
    let inventory = Arc::new(inventory);
    {
        // Configurations stored before they were sealed are sealed once, now.
        let (inv, sealer) = (Arc::clone(&inventory), Arc::clone(&sealer));
        let sealed = tokio::task::spawn_blocking(move || {
            inv.seal_plain_configs(|id, blob| {
                sealer.seal_config(id, blob).map_err(|e| e.to_string())
            })
        })
        .await?
        .context("cannot seal the stored configurations")?;
        if sealed > 0 {
            tracing::info!(
                sealed,
                "sealed configurations stored in the clear by an earlier version"
            );
        }
    }
    let power = PowerManager::new(drivers, config.bmc.manager.clone(), Arc::clone(&metrics));
    let core = Arc::new(
        Core::new(
            Arc::clone(&config),
            inventory,
            policy,
            Arc::clone(&metrics),
            crate::core::Tokens {
                registration: registration_token,
                admin: admin_token,
            },
            Arc::clone(&sealer),
        )
        .with_power(Arc::new(power)),
    );
    // The boots witnessed before the last stop, read back before anything is served.
    let timeline_file = config.data_dir.join("timeline.json");
    {
        let (timeline, file) = (Arc::clone(core.timeline()), timeline_file.clone());
        match tokio::task::spawn_blocking(move || timeline.load(&file)).await? {
            Ok(0) => {}
            Ok(n) => tracing::info!(machines = n, "boot timeline read back"),
            Err(e) => tracing::warn!(error = %e, "starting with an empty boot timeline"),
        }
    }
    let mut bound = Bound {
        http: Vec::new(),
        https: Vec::new(),
        admin: Vec::new(),
        tftp: Vec::new(),
        dhcp: Vec::new(),
    };
    // One root for TFTP and for HTTP's `/boot/` (UEFI HTTP boot loads iPXE from there).
    let boot_files = Arc::new(
        FileRoot::new(&config.tftp_root, config.cache).with_fallback(config.ipxe_dir.clone()),
    );
    let http_ctx = Arc::new(HttpContext {
        core: Arc::clone(&core),
        assets: Arc::new(FileRoot::new(&config.assets_dir, config.cache)),
        boot_files: Arc::clone(&boot_files),
        guard: http::guard::Guard::new(config.http.limits.clone()),
        sessions: http::console::Sessions::default(),
    });
    let admin_apart = !config.http.admin_listen.is_empty();
    let machines = http::Role::Machines {
        admin: !admin_apart,
    };
    let tls = if config.http.tls_listen.is_empty() && !admin_apart {
        None
    } else {
        let tls = server_tls(&config)?;
        tracing::info!(
            sha256 = %tls.sha256,
            cert = %config.tls_cert.display(),
            "HTTPS certificate (agents pin it: arges.pin=)"
        );
        Some(tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config)))
            .map(|acceptor| (acceptor, tls.sha256))
    };
    let listeners = [
        (&config.http.listen, None, machines, "HTTP"),
        (
            &config.http.tls_listen,
            tls.as_ref().map(|t| t.0.clone()),
            machines,
            "HTTPS",
        ),
        (
            &config.http.admin_listen,
            tls.as_ref().map(|t| t.0.clone()),
            http::Role::Admin,
            "the admin API",
        ),
    ];
    for (addrs, acceptor, role, what) in listeners {
        for addr in addrs {
            let l = TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot bind {what} to {addr}: {e}{}", bind_hint(&e, addr))
            })?;
            let local = l.local_addr()?;
            match (role, acceptor.is_some()) {
                (http::Role::Admin, _) => bound.admin.push(local),
                (_, true) => bound.https.push(local),
                (_, false) => bound.http.push(local),
            }
            let kind = http::Listener {
                tls: acceptor.clone(),
                role,
            };
            tasks.spawn(http::serve(
                l,
                Arc::clone(&http_ctx),
                shutdown.clone(),
                kind,
            ));
        }
    }
    if let (Some((_, pin)), Some(port)) = (&tls, bound.https.first().map(|a| a.port())) {
        core.set_agent_tls(port, pin.clone());
    }
    let tftp = TftpServer::new(
        config.tftp.clone(),
        boot_files,
        Arc::clone(&metrics),
        Arc::clone(core.timeline()),
    );
    for addr in &config.tftp_listen {
        let s = UdpSocket::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot bind TFTP to {addr}: {e}{}", bind_hint(&e, addr))
        })?;
        bound.tftp.push(s.local_addr()?);
        tasks.spawn(Arc::clone(&tftp).serve(s, shutdown.clone()));
    }
    if config.dhcp.mode == DhcpMode::Proxy {
        let server = DhcpServer::new(
            config.dhcp.clone(),
            Arc::clone(&core),
            bound.http.clone(),
            config.http.public_url.clone(),
        );
        for (role, addrs) in [
            (dhcp::Role::Dhcp, &config.dhcp.listen),
            (dhcp::Role::Pxe, &config.dhcp.pxe_listen),
        ] {
            for addr in addrs {
                let s = dhcp::bind(*addr).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot bind proxyDHCP to {addr}: {e}{}",
                        bind_hint(&e, addr)
                    )
                })?;
                bound.dhcp.push(s.local_addr()?);
                tasks.spawn(Arc::clone(&server).serve(s, role, cancel.clone()));
            }
        }
        if bound.http.iter().all(|a| a.ip().is_loopback()) && config.http.public_url.is_none() {
            tracing::warn!(http = ?bound.http, "proxyDHCP is on but HTTP listens on loopback only: machines cannot fetch their boot scripts; set http.listen");
        }
    }
    start_controller(&config, &core, &mut tasks, &cancel);
    // The audit and timeline writers outlive the drain: what the last requests record is
    // stored.
    let audit_stop = CancellationToken::new();
    let audit_writer = tokio::spawn(Arc::clone(core.audit()).run(audit_stop.clone()));
    let timeline_writer =
        tokio::spawn(Arc::clone(core.timeline()).keep_snapshot(timeline_file, audit_stop.clone()));
    tracing::info!(
        http = ?bound.http, tftp = ?bound.tftp, dhcp = ?bound.dhcp,
        tftp_root = %config.tftp_root.display(), assets = %config.assets_dir.display(), data = %config.data_dir.display(),
        "Arges appliance serving"
    );
    if let Some(path) = ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&bound)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let result = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("a server stopped")),
            Err(e) => Err(anyhow::Error::new(e).context("a server task panicked")),
        },
    };
    tracing::info!(drain = ?config.drain, "stopping: no new work; draining what is in flight");
    let drained = shutdown.drain(config.drain).await;
    if drained.cut > 0 {
        tracing::warn!(
            in_flight = drained.in_flight,
            cut = drained.cut,
            "drain deadline reached: cut what was still running"
        );
    } else {
        tracing::info!(
            in_flight = drained.in_flight,
            "drained: all work in flight finished"
        );
    }
    while tasks.join_next().await.is_some() {}
    audit_stop.cancel();
    if let Err(e) = audit_writer.await {
        tracing::error!(error = %e, "the audit writer failed at the stop");
    }
    if let Err(e) = timeline_writer.await {
        tracing::error!(error = %e, "the boot timeline writer failed at the stop");
    }
    tracing::info!("Arges appliance stopped");
    result
}
