//! The plugin host with the plugins we ship and the fault fixtures: decisions, containment,
//! hot reload, pinning, a plugin in another language, and the `arges plugin` commands.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::http::{MAC_A, UUID_A, register_machine};
use test_support::{Appliance, bin, run};

/// The shipped plugins, built once per test run (`plugins/build.sh`).
pub fn built() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/build.sh");
        let out = run(Command::new("bash").arg(script));
        assert!(
            out.status.success(),
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// One compile cache for every test, signed with one key, so big plugins are compiled
/// once per run.
pub(crate) fn cache_toml() -> String {
    format!(
        "cache_dir = \"{0}/plugin-cache\"\ncache_key_file = \"{0}/plugin-cache.key\"\n",
        env!("CARGO_TARGET_TMPDIR")
    )
}

fn wat_fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../tests/data/plugins/{name}.wat",
        env!("CARGO_MANIFEST_DIR")
    );
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn plugins_dir(a: &Appliance) -> PathBuf {
    a.data().join("plugins")
}

/// Places a file atomically, as an operator's `cp` + `mv` would.
pub(crate) fn install(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

pub(crate) fn shipped(name: &str) -> Vec<u8> {
    std::fs::read(built().join(name)).unwrap()
}

fn boot_script(a: &Appliance, uuid: &str, mac: &str) -> (u16, String) {
    let (s, b) = a.request(
        "GET",
        &format!("/boot.ipxe?uuid={uuid}&mac={mac}&arch=x86_64"),
        None,
        b"",
    );
    (s, String::from_utf8_lossy(&b).into_owned())
}

const OTHER_UUID: &str = "11111111-2222-3333-4444-555555555555";

#[tokio::test]
async fn default_policy_plugin_decides_like_the_builtin() {
    use arges::config::{LocalDiskMethod, PluginsConfig, PolicyConfig, Unaccepted};
    use arges::core::{DefaultPolicy, InventoryFacts, MachineFacts};
    use arges::plugins::PluginHost;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        built().join("default-policy.wasm"),
        dir.path().join("default-policy.wasm"),
    )
    .unwrap();
    for (unaccepted, default_env) in [
        (Unaccepted::LocalDisk, None),
        (Unaccepted::Discover, Some("talos")),
        (Unaccepted::LocalDisk, Some("talos")),
    ] {
        let mut settings =
            PluginsConfig::with_defaults(dir.path().to_path_buf(), dir.path().join("cache"));
        let mut table = vec![(
            "unaccepted".to_string(),
            if unaccepted == Unaccepted::Discover {
                "discover"
            } else {
                "local-disk"
            }
            .to_string(),
        )];
        if let Some(e) = default_env {
            table.push(("default_environment".into(), e.into()));
        }
        settings.config.insert("default-policy".into(), table);
        let host = PluginHost::new(settings, Arc::new(arges::metrics::Metrics::new())).unwrap();
        let plugin = host
            .load_file(&dir.path().join("default-policy.wasm"))
            .unwrap();
        let builtin = DefaultPolicy {
            config: PolicyConfig {
                unaccepted,
                default_environment: default_env.map(String::from),
                local_disk_method: LocalDiskMethod::Exit,
                local_disk_method_by_arch: Default::default(),
                max_unaccepted: 0,
            },
        };
        let mut cases = 0;
        for registered in [false, true] {
            for accepted in [false, true] {
                for cordoned in [false, true] {
                    for environment in [None, Some("rescue".to_string())] {
                        let facts = MachineFacts {
                            uuid: Some(UUID_A.into()),
                            mac: Some(MAC_A.into()),
                            arch: Some("x86_64".into()),
                            client_address: "10.0.0.7".parse().unwrap(),
                            inventory: InventoryFacts {
                                registered,
                                accepted,
                                cordoned,
                                environment,
                                ..Default::default()
                            },
                            hardware: Default::default(),
                        };
                        let from_plugin = host.decide(&plugin, &facts).await.unwrap();
                        assert_eq!(from_plugin, Some(builtin.decide_now(&facts)), "{facts:?}");
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 16);
    }
}

#[test]
fn faults_are_contained_while_other_machines_keep_booting() {
    let modes = [
        "loop",
        "memory",
        "trap",
        "huge",
        "error",
        "bad-env",
        "log-flood",
    ];
    let mut extra = format!(
        "[plugins]\n{}timeout_ms = 50\nmemory_bytes = 33554432\n",
        cache_toml()
    );
    for m in modes {
        extra.push_str(&format!("[plugins.config.{m}]\nmode = \"{m}\"\n"));
    }
    let a = Arc::new(Appliance::start(&extra));
    test_support::random_file(&a.tftp_root().join("ipxe.efi"), 300_000, 40);
    // Another machine boots over and over the whole time, over HTTP and TFTP.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let other = {
        let (a, stop, ok, failed) = (
            Arc::clone(&a),
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
        );
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 10_000 {
                rounds += 1;
                let (s, script) = boot_script(&a, OTHER_UUID, "52:54:00:99:99:99");
                let tftp = run(Command::new("curl")
                    .args([
                        "-s",
                        "--max-time",
                        "10",
                        "-o",
                        "/dev/null",
                        "--tftp-blksize",
                        "1468",
                    ])
                    .arg(format!("tftp://127.0.0.1:{}/ipxe.efi", a.tftp.port())));
                if s == 200 && script.contains("/env/discovery/vmlinuz") && tftp.status.success() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let faults = shipped("faults.wasm");
    let expect = [
        ("loop", "timeout"),
        ("memory", "memory"),
        ("trap", "trap"),
        ("huge", "malformed"),
        ("error", "refused"),
        ("bad-env", "malformed"),
    ];
    for (mode, kind) in expect {
        install(&plugins_dir(&a), &format!("{mode}.wasm"), &faults);
        a.wait_metric(&format!("arges_plugin_loads_total{{plugin=\"{mode}\""));
        a.wait_metric("arges_plugins_active 1");
        // The machine still gets the built-in answer, at once.
        let (s, script) = boot_script(&a, UUID_A, MAC_A);
        assert_eq!(s, 200, "{mode}: {script}");
        assert!(
            script.contains("/env/discovery/vmlinuz"),
            "{mode}: {script}"
        );
        a.wait_metric(&format!(
            "arges_plugin_calls_total{{plugin=\"{mode}\",result=\"{kind}\"}}"
        ));
        std::fs::remove_file(plugins_dir(&a).join(format!("{mode}.wasm"))).unwrap();
        a.wait_metric("arges_plugins_active 0");
    }
    // A flood of log lines is cut per call, and the plugin's answer still counts.
    install(&plugins_dir(&a), "log-flood.wasm", &faults);
    a.wait_metric("arges_plugins_active 1");
    assert_eq!(boot_script(&a, UUID_A, MAC_A).0, 200);
    a.wait_metric("arges_plugin_calls_total{plugin=\"log-flood\",result=\"pass\"}");
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "another machine failed to boot during the faults"
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    let m = a.metrics();
    assert!(m.contains("arges_policy_fallbacks_total"), "{m}");
    let log = a.log();
    assert!(log.contains("plugin logs too much"), "log flood not cut");
    // Each call logs at most its first 100 lines (0..=99), however many calls there were.
    assert!(
        log.contains("line 99") && !log.contains("line 100"),
        "the per-call log cap did not hold"
    );
}

#[test]
fn plugins_have_no_files_and_no_network() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = Appliance::prepare(&format!(
        "[plugins]\n{}[plugins.config.escape]\nmode = \"escape\"\nconnect = \"{addr}\"\n",
        cache_toml()
    ));
    install(
        &dir.path().join("data/plugins"),
        "escape.wasm",
        &shipped("faults.wasm"),
    );
    let a = Appliance::start_in(dir, &[]);
    a.wait_metric("arges_plugins_active 1");
    let (s, script) = boot_script(&a, UUID_A, MAC_A);
    assert!(
        s == 200 && script.contains("/env/discovery/vmlinuz"),
        "{script}"
    );
    a.wait_metric("arges_plugin_calls_total{plugin=\"escape\",result=\"refused\"}");
    let log = a.log();
    assert!(
        log.contains("sandboxed: file:") && log.contains("network:"),
        "{log}"
    );
    assert!(
        listener.accept().is_err(),
        "the plugin reached a socket on the host"
    );
}

#[test]
fn broken_files_are_refused_at_load_and_nothing_else_changes() {
    let dir = Appliance::prepare(&format!("[plugins]\n{}", cache_toml()));
    let plugins = dir.path().join("data/plugins");
    install(&plugins, "wrong-world.wasm", &wat_fixture("wrong-world"));
    install(&plugins, "core-module.wasm", &wat_fixture("core-module"));
    install(
        &plugins,
        "garbage.wasm",
        b"\0asm this is not webassembly at all",
    );
    install(&plugins, "bad name!.wasm", &shipped("default-policy.wasm"));
    let a = Appliance::start_in(dir, &[]);
    let m =
        a.wait_metric("arges_plugin_loads_total{plugin=\"wrong-world\",result=\"wrong_world\"}");
    assert!(
        m.contains("arges_plugin_loads_total{plugin=\"core-module\",result=\"invalid\"}"),
        "{m}"
    );
    assert!(
        m.contains("arges_plugin_loads_total{plugin=\"garbage\",result=\"invalid\"}"),
        "{m}"
    );
    assert!(m.contains("arges_plugins_active 0"), "{m}");
    let log = a.log();
    assert!(
        log.contains("type-checking export func `decide`") && log.contains("it exports [decide]"),
        "{log}"
    );
    assert!(log.contains("a plugin file name may only hold"), "{log}");
    let (s, script) = boot_script(&a, UUID_A, MAC_A);
    assert!(
        s == 200 && script.contains("/env/discovery/vmlinuz"),
        "{script}"
    );
}

#[test]
fn hot_reload_replace_keep_last_good_remove() {
    let rules = "[plugins.config.hardware-policy]\nrules = [{ environment = \"talos\", vendor = \"Dell Inc.\", min_memory_gb = 32, min_disks = 2 }]\n";
    let a = Appliance::start(&format!("[plugins]\n{}{rules}", cache_toml()));
    assert!(register_machine(&a, "a").status.success());
    assert_eq!(
        a.request(
            "POST",
            &format!("/api/v1/servers/{UUID_A}/accept"),
            Some(test_support::ADMIN_TOKEN),
            b""
        )
        .0,
        200
    );
    // No plugin: accepted without an environment boots from disk.
    assert!(boot_script(&a, UUID_A, MAC_A).1.contains("\nexit\n"));
    // Added: the hardware decides.
    install(
        &plugins_dir(&a),
        "hardware-policy.wasm",
        &shipped("hardware-policy.wasm"),
    );
    a.wait_metric("arges_plugins_active 1");
    let (_, script) = boot_script(&a, UUID_A, MAC_A);
    assert!(script.contains("/env/talos/vmlinuz"), "{script}");
    // Replaced by something broken: the last good version keeps serving.
    install(&plugins_dir(&a), "hardware-policy.wasm", b"broken upload");
    a.wait_metric("arges_plugin_loads_total{plugin=\"hardware-policy\",result=\"invalid\"}");
    assert!(
        boot_script(&a, UUID_A, MAC_A)
            .1
            .contains("/env/talos/vmlinuz")
    );
    assert!(a.log().contains("keeping the last good version"));
    // Replaced by a working plugin with other rules: takes over.
    install(
        &plugins_dir(&a),
        "hardware-policy.wasm",
        &shipped("default-policy.wasm"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !boot_script(&a, UUID_A, MAC_A).1.contains("\nexit\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "the replacement never took over:\n{}",
            a.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Removed: the built-in policy again.
    std::fs::remove_file(plugins_dir(&a).join("hardware-policy.wasm")).unwrap();
    a.wait_metric("arges_plugins_active 0");
    assert!(boot_script(&a, UUID_A, MAC_A).1.contains("\nexit\n"));
}

#[test]
fn python_and_javascript_plugins_in_an_ordered_chain() {
    let dir = Appliance::prepare(&format!(
        "[plugins]\n{}order = [\"deny-list-py\", \"rack-gate-js\", \"default-policy\"]\n\
         [plugins.config.deny-list-py]\nmacs = \"{MAC_A}, 00:11:22:33:44:55\"\n\
         [plugins.config.rack-gate-js]\nclosed_racks = \"r6, r7\"\n\
         [plugins.config.default-policy]\ndefault_environment = \"talos\"\n",
        cache_toml()
    ));
    let plugins = dir.path().join("data/plugins");
    install(
        &plugins,
        "default-policy.wasm",
        &shipped("default-policy.wasm"),
    );
    install(&plugins, "deny-list-py.wasm", &shipped("deny-list-py.wasm"));
    install(&plugins, "rack-gate-js.wasm", &shipped("rack-gate-js.wasm"));
    let a = Appliance::start_in(dir, &[]);
    a.wait_metric("arges_plugins_active 3");
    let (s, script) = boot_script(&a, UUID_A, MAC_A);
    assert_eq!(s, 200);
    assert!(
        script.contains("echo Arges: boot denied") && script.contains("deny list"),
        "{script}"
    );
    // Not listed: the Python plugin passes, default-policy decides (unknown: discover).
    let (_, script) = boot_script(&a, OTHER_UUID, "52:54:00:00:00:77");
    assert!(script.contains("/env/discovery/vmlinuz"), "{script}");
    // A machine in a closed rack: the JavaScript plugin refuses it, in its words.
    let racked = test_support::Registration::numbered(3);
    a.register(&racked);
    let (code, _) = a.request(
        "PUT",
        &format!("/api/v1/servers/{}/labels", racked.uuid()),
        Some(test_support::ADMIN_TOKEN),
        br#"{"rack":"r7"}"#,
    );
    assert_eq!(code, 200);
    let (_, script) = boot_script(&a, racked.uuid(), racked.mac());
    assert!(
        script.contains(&format!(
            "echo Arges: boot denied for {}: rack r7 is closed (config closed_racks)\n",
            racked.uuid()
        )),
        "{script}"
    );
    let m = a.metrics();
    for want in [
        "{plugin=\"deny-list-py\",result=\"decided\"} 1",
        "{plugin=\"deny-list-py\",result=\"pass\"} 2",
        "{plugin=\"rack-gate-js\",result=\"pass\"} 1",
        "{plugin=\"rack-gate-js\",result=\"decided\"} 1",
        "{plugin=\"default-policy\",result=\"decided\"} 1",
    ] {
        assert!(
            m.contains(&format!("arges_plugin_calls_total{want}")),
            "{want}:\n{m}"
        );
    }
    // Each plugin's call time, apart.
    for plugin in ["deny-list-py", "rack-gate-js", "default-policy"] {
        assert!(
            m.contains(&format!(
                "arges_plugin_call_seconds_count{{plugin=\"{plugin}\"}}"
            )),
            "{plugin}'s call time:\n{m}"
        );
    }
    assert!(
        a.log().contains("refusing to boot b8:ca:3a:00:00:0a"),
        "the plugin's log line reaches the appliance log"
    );
    // Each machine's boot timeline names the plugin that decided.
    for (mac, action, by) in [
        (MAC_A, "deny", "deny-list-py"),
        ("52:54:00:00:00:77", "discover", "default-policy"),
    ] {
        let (code, body) = a.request(
            "GET",
            &format!("/api/v1/boots/{mac}"),
            Some(test_support::ADMIN_TOKEN),
            b"",
        );
        assert_eq!(code, 200);
        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let step = &m["boots"][0]["steps"][0];
        assert_eq!(
            (step["action"].as_str(), step["by"].as_str()),
            (Some(action), Some(by)),
            "{m}"
        );
    }
}

#[test]
fn pinned_plugins_must_match() {
    let good = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(shipped("default-policy.wasm")))
    };
    for (pin, loaded) in [("0".repeat(64), false), (good, true)] {
        let dir = Appliance::prepare(&format!(
            "[plugins]\n{}[plugins.pins]\ndefault-policy = \"{pin}\"\n",
            cache_toml()
        ));
        install(
            &dir.path().join("data/plugins"),
            "default-policy.wasm",
            &shipped("default-policy.wasm"),
        );
        let a = Appliance::start_in(dir, &[]);
        if loaded {
            a.wait_metric("arges_plugins_active 1");
        } else {
            a.wait_metric(
                "arges_plugin_loads_total{plugin=\"default-policy\",result=\"pin_mismatch\"}",
            );
            assert!(a.metrics().contains("arges_plugins_active 0"));
        }
    }
}

#[test]
fn plugin_check_and_decide_commands() {
    let out = run(Command::new(bin())
        .args(["plugin", "check"])
        .arg(built().join("hardware-policy.wasm")));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!(
        "arges:plugin/boot-policy@{}",
        arges::plugins::CONTRACT_VERSION
    )));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wrong.wasm"), wat_fixture("wrong-world")).unwrap();
    let out = run(Command::new(bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("wrong.wasm")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an arges:plugin@0.1.1 boot-policy"),
        "{out:?}"
    );
    let facts = dir.path().join("facts.json");
    std::fs::write(&facts, serde_json::json!({
        "uuid": UUID_A, "mac": MAC_A, "arch": "x86_64", "client_address": "10.0.0.7",
        "inventory": {"registered": true, "server_id": UUID_A, "accepted": true, "cordoned": false, "environment": null, "labels": {"rack": "r7"}},
        "hardware": {"vendor": "Supermicro", "product": "SSG-6049P", "cpus": 32, "memory_bytes": 274877906944u64, "disks": 12, "nics": 2},
    }).to_string()).unwrap();
    let rules = r#"rules=[{"environment":"storage","vendor":"Supermicro","min_disks":8,"labels":{"rack":"r7"}}]"#;
    let out = run(Command::new(bin())
        .args(["plugin", "decide"])
        .arg(built().join("hardware-policy.wasm"))
        .arg("--facts")
        .arg(&facts)
        .args(["--config", rules]));
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["decision"],
        serde_json::json!({"action": "environment", "value": "storage"})
    );
    assert!(v["second_call_us"].as_u64().is_some());
    let out = run(Command::new(bin())
        .args(["plugin", "decide"])
        .arg(built().join("faults.wasm"))
        .arg("--facts")
        .arg(&facts)
        .args(["--config", "mode=loop", "--timeout-ms", "30"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ran past its deadline of 30ms"),
        "{out:?}"
    );
}

#[test]
fn a_fail_closed_policy_that_fails_denies_every_boot_under_a_flood() {
    // A deny list that never answers in time (the loop fault), declared fail-closed: a
    // flood of boots for a machine it would deny gets only denials, never a boot.
    let a = Arc::new(Appliance::start(&format!(
        "[plugins]\n{}timeout_ms = 20\nfail_closed = [\"guard\"]\n[plugins.config.guard]\nmode = \"loop\"\n",
        cache_toml()
    )));
    install(&plugins_dir(&a), "guard.wasm", &shipped("faults.wasm"));
    a.wait_metric("arges_plugins_active 1");
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    (0..25)
                        .map(|_| boot_script(&a, UUID_A, MAC_A))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(answers.len(), 200);
    for (status, script) in &answers {
        assert_eq!(*status, 200, "{script}");
        assert!(
            script.contains("boot denied") && !script.contains("/env/"),
            "a fail-closed failure let the machine boot: {script}"
        );
    }
    assert!(
        a.log()
            .contains("fail-closed boot policy failed; the boot is denied")
    );
    assert!(
        !a.metrics().contains("arges_policy_fallbacks_total 1"),
        "no failure fell back to the built-in decision"
    );
}

#[test]
fn a_tampered_compile_in_the_cache_is_never_run() {
    // Its own cache and key: this test tampers with them.
    let mut a = Appliance::start("[plugins]\ntimeout_ms = 200\n");
    install(
        &plugins_dir(&a),
        "default-policy.wasm",
        &shipped("default-policy.wasm"),
    );
    a.wait_metric("arges_plugins_active 1");
    let cache = a.data().join("plugin-cache");
    let cached = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a cached compile");
    // Unchanged, a restart loads the cached compile.
    a.restart_after_kill9();
    a.wait_metric("arges_plugins_active 1");
    assert!(a.log().contains("from_cache=true"), "{}", a.log());
    // One byte changed in the compiled code: not run, compiled again from the source.
    let mut bytes = std::fs::read(&cached).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&cached, &bytes).unwrap();
    a.restart_after_kill9();
    a.wait_metric("arges_plugins_active 1");
    let log = a.log();
    assert!(
        log.contains("cached compile does not carry this appliance's signature"),
        "{log}"
    );
    assert_eq!(boot_script(&a, UUID_A, MAC_A).0, 200);
    assert_ne!(
        std::fs::read(&cached).unwrap(),
        bytes,
        "replaced by a fresh compile"
    );
}
