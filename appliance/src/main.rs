//! The `arges` binary: parses the command line, sets up logging, and hands each
//! subcommand to the library: `run` (the appliance, stopped by SIGTERM), `check-config`
//! and `doctor` (what a config and a head node lack), `agent` (the discovery agent,
//! wiping first in wipe mode), `loadtest`, `crds`, `components`, and the admin and plugin commands
//! (`bmc`, `server`, `plugin`). Each arm only gathers its options and reports the result.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use arges::agent::{self, AgentOptions};
use arges::config::{Config, Overrides};
use arges::registration::RegistrationMode;
use clap::Parser;
use tokio_util::sync::CancellationToken;

mod admin_cli;
mod cli;
#[cfg(feature = "plugins")]
mod plugin_cli;
use cli::{AgentArgs, Cli, Command, LoadtestArgs, RunArgs};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARGES_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journald gets plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command {
                    Command::Run(args) => run(args).await,
                    Command::CheckConfig { file } => check_config(&file),
                    Command::Doctor { config, dhcp } => doctor(config.as_deref(), dhcp),
                    #[cfg(feature = "kubernetes")]
                    Command::Crds => {
                        print!("{}", arges::controller::resources::crds_yaml());
                        Ok(())
                    }
                    #[cfg(feature = "kubernetes")]
                    Command::Components => {
                        print!("{}", arges::controller::components::components_yaml()?);
                        Ok(())
                    }
                    Command::Agent(args) => run_agent(args).await,
                    Command::Loadtest(args) => run_loadtest(args).await,
                    #[cfg(feature = "plugins")]
                    Command::Plugin(cmd) => plugin_cli::run(cmd).await,
                    Command::Bmc(args) => admin_cli::bmc(args).await,
                    Command::Server(args) => admin_cli::server(args).await,
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let overrides = Overrides {
        http: args.http,
        tftp: args.tftp,
        tftp_root: args.tftp_root,
        assets_dir: args.assets,
        data_dir: args.data_dir,
        plugins_dir: args.plugins,
        dhcp: args.dhcp,
        dhcp_interfaces: args.dhcp_interface,
        kubeconfig: args.kubeconfig,
        watch_namespace: args.watch_namespace,
        public_url: args.public_url,
    };
    let config = match &args.config {
        Some(path) => Config::load(path, &overrides)?,
        None => Config::defaults(&overrides)?,
    };
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    arges::app::run(config, args.ready_file, cancel).await
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let c = Config::load(file, &Overrides::default())?;
    println!("{}: ok", file.display());
    println!("  http:         {:?}", c.http.listen);
    println!(
        "  tftp:         {:?} serving {}",
        c.tftp_listen,
        c.tftp_root.display()
    );
    if let Some(ipxe) = &c.ipxe_dir {
        println!("  iPXE folder:  {}", ipxe.display());
    }
    println!("  assets:       {}", c.assets_dir.display());
    println!("  data:         {}", c.data_dir.display());
    println!("  plugins:      {}", c.plugins.dir.display());
    println!("  discovery:    {}", c.discovery_environment);
    println!(
        "  proxyDHCP:    {:?} on {:?} and {:?}",
        c.dhcp.mode, c.dhcp.listen, c.dhcp.pxe_listen
    );
    for env in c.environments.values() {
        let missing: Vec<_> = env
            .files()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        let note = if missing.is_empty() {
            String::new()
        } else {
            format!("  (missing: {})", missing.join(", "))
        };
        println!(
            "  environment:  {} kernel {}{note}",
            env.name,
            env.kernel.display()
        );
    }
    Ok(())
}

fn doctor(file: Option<&std::path::Path>, dhcp: Option<arges::config::DhcpMode>) -> Result<()> {
    use arges::doctor::Severity;
    let overrides = Overrides {
        dhcp,
        ..Overrides::default()
    };
    let config = match file {
        Some(path) => Config::load(path, &overrides)?,
        None => Config::defaults(&overrides)?,
    };
    #[allow(unused_mut)]
    let mut findings = arges::doctor::check(&config, arges::config::file::is_root());
    #[cfg(feature = "plugins")]
    findings.extend(arges::doctor::plugins(&config));
    for f in &findings {
        let mark = match f.severity {
            Severity::Ok => "ok     ",
            Severity::Warning => "warning",
            Severity::Missing => "MISSING",
        };
        println!("{mark}  {}", f.message);
    }
    let missing = findings
        .iter()
        .filter(|f| f.severity == Severity::Missing)
        .count();
    anyhow::ensure!(
        missing == 0,
        "{missing} problem(s) will stop machines from booting"
    );
    Ok(())
}

async fn run_agent(args: AgentArgs) -> Result<()> {
    let cmdline = std::fs::read_to_string(&args.cmdline).unwrap_or_default();
    let param = |key: &str| agent::facts::cmdline_param(&cmdline, key);
    let opts = AgentOptions {
        appliance: args
            .appliance
            .or_else(|| param("arges.appliance"))
            .unwrap_or_default(),
        token: args
            .token
            .or_else(|| param("arges.token"))
            .unwrap_or_default(),
        mode: args
            .mode
            .or_else(|| param("arges.mode"))
            .unwrap_or_default()
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{e}"))?,
        root: args.root,
        uuid: args.uuid,
        ipmi_device: args.ipmi_device,
        timeout: Duration::from_secs(args.timeout),
        pin: args
            .pin
            .or_else(|| param("arges.pin"))
            .filter(|p| !p.is_empty()),
    };
    let reg = agent::collect(&opts)?;
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(&reg)?);
        return Ok(());
    }
    if opts.appliance.is_empty() || opts.token.is_empty() {
        anyhow::bail!(
            "the appliance URL and the registration token are needed (--appliance/--token or arges.appliance=/arges.token= on the kernel command line)"
        );
    }
    if opts.mode == RegistrationMode::Wipe {
        // The registration below reports the wipe: it must not be sent unless every
        // disk was wiped.
        let wiped = agent::wipe::wipe_disks(&opts.root, &reg.hardware.disks)
            .context("the wipe failed; not reporting this machine clean")?;
        tracing::info!(disks = ?wiped, "disks wiped");
    }
    let resp = match agent::register(&opts, &reg).await {
        Ok(r) => r,
        Err(e @ agent::AgentError::Refused { .. }) => {
            // Asking again would get the same answer: say so, and let the machine power
            // off (exit status 3) instead of rebooting into a loop.
            eprintln!("error: {e}");
            println!("power-off");
            std::process::exit(agent::REFUSED_EXIT);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(server = %resp.server_id, action = ?resp.action, conflict = resp.uuid_conflict, "registered");
    let action = serde_json::to_value(resp.action)?;
    println!("{}", action.as_str().unwrap_or("power-off"));
    Ok(())
}

async fn run_loadtest(args: LoadtestArgs) -> Result<()> {
    let report = arges::loadtest::run(arges::loadtest::LoadtestOptions {
        http: args.http,
        tftp: args.tftp,
        token: args.token,
        tftp_file: args.file,
        machines: args.machines,
        concurrency: args.concurrency,
        max_duration: Duration::from_secs(args.max_seconds),
        run_id: arges::loadtest::random_run_id(),
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} machines: {} registered, {} failed in {:.1} s: {:.1} machines/s; time to registered p50 {:.2} s, p99 {:.2} s, max {:.2} s; {} TFTP retransmits; {:.1} GB moved",
            report.machines,
            report.registered,
            report.failed,
            report.seconds,
            report.machines_per_second,
            report.p50_seconds,
            report.p99_seconds,
            report.max_seconds,
            report.tftp_retransmits,
            report.bytes as f64 / 1e9
        );
        for (kind, n) in &report.errors {
            println!("  errors: {kind}: {n}");
        }
    }
    anyhow::ensure!(report.failed == 0, "{} machines failed", report.failed);
    Ok(())
}
