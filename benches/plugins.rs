//! Criterion: the cost of a plugin decision, and of a whole boot decision with a plugin.
//!
//! - a decision on a warm instance (one instance, called again and again);
//! - instantiate-per-call from `InstancePre`, as the appliance does, with and without the
//!   pooling allocator;
//! - `Core::decide_boot` (lookup, policy, template rendering) with the built-in policy and
//!   with the `default-policy` plugin, side by side in one run.
//!
//! Needs the shipped plugins: `plugins/build.sh` is run first when they are missing.

use std::path::PathBuf;
use std::sync::Arc;

use arges::config::{Config, Overrides, PluginsConfig};
use arges::core::{BootPolicy, BootRequest, Core, DefaultPolicy, InventoryFacts, MachineFacts};
use arges::inventory::Inventory;
use arges::metrics::Metrics;
use arges::plugins::PluginHost;
use criterion::{Criterion, criterion_group, criterion_main};

fn plugins_out() -> PathBuf {
    let out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/out"));
    if !out.join("default-policy.wasm").exists() {
        let status = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/build.sh"))
            .status()
            .expect("run plugins/build.sh");
        assert!(status.success(), "plugins/build.sh failed");
    }
    out
}

fn facts() -> MachineFacts {
    MachineFacts {
        uuid: Some("4c4c4544-0042-3510-8051-b4c04f595031".into()),
        mac: Some("52:54:00:12:34:56".into()),
        arch: Some("x86_64".into()),
        client_address: "10.0.0.7".parse().unwrap(),
        inventory: InventoryFacts {
            registered: true,
            accepted: true,
            environment: Some("talos".into()),
            ..Default::default()
        },
        hardware: Default::default(),
    }
}

fn host(dir: &std::path::Path, pooling: bool, reuse: bool) -> Arc<PluginHost> {
    let mut settings = PluginsConfig::with_defaults(dir.to_path_buf(), dir.join("cache"));
    settings.pooling = pooling;
    settings.reuse_instances = reuse;
    settings.max_instances = 64;
    PluginHost::new(settings, Arc::new(Metrics::new())).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        plugins_out().join("default-policy.wasm"),
        dir.path().join("default-policy.wasm"),
    )
    .unwrap();
    let facts = facts();

    let mut g = c.benchmark_group("plugin decision");
    let wasm = dir.path().join("default-policy.wasm");
    let pooled = host(dir.path(), true, true);
    let plugin = pooled.load_file(&wasm).unwrap();
    let mut warm = rt.block_on(pooled.warm_instance(&plugin)).unwrap();
    g.bench_function("warm instance", |b| {
        b.iter(|| rt.block_on(warm.decide(&facts)).unwrap())
    });
    g.bench_function("host call, instance reused (default)", |b| {
        b.to_async(&rt)
            .iter(|| async { pooled.decide(&plugin, &facts).await.unwrap() })
    });
    for (label, pooling) in [
        ("instantiate per call, pooling", true),
        ("instantiate per call, on demand", false),
    ] {
        let h = host(dir.path(), pooling, false);
        let p = h.load_file(&wasm).unwrap();
        g.bench_function(label, |b| {
            b.to_async(&rt)
                .iter(|| async { h.decide(&p, &facts).await.unwrap() })
        });
    }
    g.finish();

    // A whole boot decision for an unknown machine: no inventory write, so the policy and
    // rendering are what is measured.
    let data = tempfile::tempdir().unwrap();
    let config = Arc::new(
        Config::defaults(&Overrides {
            data_dir: Some(data.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap(),
    );
    let inventory = Arc::new(Inventory::open(&data.path().join("inventory.redb")).unwrap());
    let metrics = Arc::new(Metrics::new());
    let sealer =
        Arc::new(arges::sealing::Sealer::open_or_create(&data.path().join("secrets.key")).unwrap());
    let core_for = |policy: Option<Arc<dyn BootPolicy>>| {
        Core::new(
            Arc::clone(&config),
            Arc::clone(&inventory),
            policy,
            Arc::clone(&metrics),
            arges::core::Tokens {
                registration: "r".repeat(32),
                admin: "a".repeat(32),
            },
            Arc::clone(&sealer),
        )
    };
    let builtin = core_for(None);
    pooled.rescan();
    let with_plugin = core_for(Some(Arc::new(pooled.chain(DefaultPolicy {
        config: config.policy.clone(),
    }))));
    let req = || BootRequest {
        uuid: Some("11111111-2222-3333-4444-555555555555".into()),
        mac: Some("52:54:00:00:00:01".into()),
        arch: Some("x86_64".into()),
        source: "10.0.0.7".parse().unwrap(),
        base_url: "http://10.0.0.1:8080".into(),
    };
    let mut g = c.benchmark_group("boot decision");
    g.bench_function("built-in policy", |b| {
        b.to_async(&rt)
            .iter(|| async { builtin.decide_boot(req()).await.unwrap() })
    });
    g.bench_function("default-policy plugin", |b| {
        b.to_async(&rt)
            .iter(|| async { with_plugin.decide_boot(req()).await.unwrap() })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
