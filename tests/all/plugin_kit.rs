//! A plugin author's flow, for each starter language, as an outsider would go through it:
//! `arges plugin new`, the starter's own build script, `arges plugin check` (cold, then
//! from the cache), `arges plugin test --cases` on the starter's cases, `arges plugin
//! decide` for the warm decision time, then into a running appliance: its decision used
//! (a deny reason with spaces and parentheses reads as written in the served script), the
//! source changed, rebuilt, replaced and hot-reloaded. Prints each language's figures
//! (component size, build, cold compile, cached load, warm decision) side by side with
//! `--nocapture`, and keeps them in `CARGO_TARGET_TMPDIR/plugin-kit/`. The JavaScript one also builds with componentize-js's defaults, which
//! import `wasi:http`, and checks that the refusal names the interface.
//! And a component built against the contract's previous version still loads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use test_support::{ADMIN_TOKEN, Appliance, Registration, bin, eventually, run};

use crate::plugins::{built, cache_toml, install};

/// Where plugins/build.sh keeps the tools it installs (componentize-py, componentize-js).
fn tools() -> PathBuf {
    built();
    std::env::var_os("ARGES_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/arges-tools"))
}

/// The target folder plugins/build.sh builds the Rust plugins in: a starter shares its
/// compiled dependencies.
fn plugin_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target"))
        .join("plugins")
}

fn arges(args: &[&str], tmp: &Path) -> std::process::Output {
    run(Command::new(bin()).args(args).env("XDG_CACHE_HOME", tmp))
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the starter's build script as its README says, with the tools where the test
/// command installed them.
fn build(lang: &str, project: &Path) -> Duration {
    let mut cmd = Command::new(project.join("build.sh"));
    match lang {
        "rust" => {
            cmd.env("CARGO_TARGET_DIR", plugin_target());
        }
        "python" => {
            cmd.env("COMPONENTIZE_PY", tools().join("venv/bin/componentize-py"));
        }
        _ => {
            // The tools' node_modules holds the version the starter pins.
            let modules = project.join("node_modules");
            if !modules.exists() {
                std::os::unix::fs::symlink(tools().join("js/node_modules"), &modules).unwrap();
            }
        }
    }
    let started = Instant::now();
    ok(&run(&mut cmd), &format!("{lang} build.sh"));
    started.elapsed()
}

/// "loaded:  1.2s (compiled)" as a duration.
fn loaded(check: &str) -> Duration {
    let line = check
        .lines()
        .find_map(|l| l.trim().strip_prefix("loaded:"))
        .expect("a loaded: line");
    let d = line.split_whitespace().next().unwrap();
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap());
    let n: f64 = n.parse().unwrap();
    Duration::from_secs_f64(match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" => n / 1e6,
        "ns" => n / 1e9,
        u => panic!("unit {u} in {line}"),
    })
}

/// `arges plugin new NAME --lang LANG` into `work/NAME`.
fn new_project(work: &Path, name: &str, lang: &str) -> PathBuf {
    let project = work.join(name);
    let p = project.display().to_string();
    ok(
        &arges(&["plugin", "new", name, "--lang", lang, "--dir", &p], work),
        "plugin new",
    );
    project
}

fn boot_script(a: &Appliance, uuid: &str, mac: &str) -> String {
    let (code, script) = a.boot_script(uuid, mac, "127.0.0.1");
    assert_eq!(code, 200, "{script}");
    script
}

fn outsider_flow(lang: &str, source: &str) {
    let name = format!("kit-{lang}");
    let work = tempfile::tempdir().unwrap();
    let tmp = work.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let project = new_project(work.path(), &name, lang);
    let build_time = build(lang, &project);
    let wasm = project.join(format!("{name}.wasm"));
    let w = wasm.display().to_string();
    let size = std::fs::metadata(&wasm)
        .expect("the build made NAME.wasm")
        .len();

    let cold = ok(&arges(&["plugin", "check", &w], &tmp), "plugin check");
    assert!(
        cold.contains("(compiled)") && cold.contains("boot-policy"),
        "{cold}"
    );
    let cached = ok(&arges(&["plugin", "check", &w], &tmp), "plugin check again");
    assert!(cached.contains("from cache"), "{cached}");

    let cases = project.join("cases.yaml").display().to_string();
    let tested = ok(
        &arges(&["plugin", "test", &w, "--cases", &cases], &tmp),
        "plugin test",
    );
    assert!(tested.contains("4 cases: 4 passed, 0 failed"), "{tested}");
    assert_eq!(
        tested.lines().filter(|l| l.starts_with("ok ")).count(),
        4,
        "{tested}"
    );
    // A case that does not hold fails the run, and says what it got.
    let other = arges(
        &[
            "plugin",
            "test",
            &w,
            "--cases",
            &cases,
            "--config",
            "environment=other",
        ],
        &tmp,
    );
    let text = String::from_utf8_lossy(&other.stdout);
    assert!(!other.status.success(), "{text}");
    assert!(
        text.contains("FAIL  an accepted machine boots the configured environment: environment \"other\", expected environment \"talos\"")
            && text.contains("4 cases: 3 passed, 1 failed"),
        "{text}"
    );
    let facts = work.path().join("facts.yaml");
    std::fs::write(&facts, "inventory: {registered: true, accepted: true}\n").unwrap();
    let decided = ok(
        &arges(
            &[
                "plugin",
                "decide",
                &w,
                "--facts",
                &facts.display().to_string(),
                "--config",
                "environment=talos",
            ],
            &tmp,
        ),
        "plugin decide",
    );
    let decided: serde_json::Value = serde_json::from_str(&decided).unwrap();
    assert_eq!(decided["decision"]["value"], "talos", "{decided}");
    let warm_us = decided["second_call_us"].as_u64().unwrap();

    // Into a running appliance.
    let dir = Appliance::prepare(&format!(
        "[plugins]\n{}timeout_ms = 5000\n[plugins.config.{name}]\nenvironment = \"talos\"\n",
        cache_toml()
    ));
    let plugins = dir.path().join("data/plugins");
    let a = Appliance::start_in(dir, &[]);
    install(
        &plugins,
        &format!("{name}.wasm"),
        &std::fs::read(&wasm).unwrap(),
    );
    a.wait_metric("arges_plugins_active 1");
    let held = Registration::numbered(1);
    let accepted = Registration::numbered(2);
    a.register(&held);
    a.register(&accepted);
    let (code, _) = a.request(
        "PUT",
        &format!("/api/v1/servers/{}/labels", held.uuid()),
        Some(ADMIN_TOKEN),
        br#"{"quarantine":"true"}"#,
    );
    assert_eq!(code, 200);
    let (code, _) = a.request(
        "POST",
        &format!("/api/v1/servers/{}/accept", accepted.uuid()),
        Some(ADMIN_TOKEN),
        b"",
    );
    assert_eq!(code, 200);
    let script = boot_script(&a, held.uuid(), held.mac());
    let expected = format!(
        "echo Arges: boot denied for {}: quarantined (label quarantine=true): ask the operator\n",
        held.uuid()
    );
    assert!(
        script.contains(&expected),
        "the reason as written:\n{script}"
    );
    assert!(
        boot_script(&a, accepted.uuid(), accepted.mac()).contains("/env/talos/"),
        "the plugin's environment"
    );

    // Changed, rebuilt, replaced: the next boot gets the new reason, no restart.
    let file = project.join(source);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("ask the operator"));
    std::fs::write(
        &file,
        text.replace("ask the operator", "held for inspection"),
    )
    .unwrap();
    build(lang, &project);
    install(
        &plugins,
        &format!("{name}.wasm"),
        &std::fs::read(&wasm).unwrap(),
    );
    eventually(120, "the rebuilt plugin's reason", || {
        boot_script(&a, held.uuid(), held.mac())
            .contains("quarantined (label quarantine=true): held for inspection\n")
            .then_some(())
    });

    let figures = format!(
        "plugin kit, {lang:>6}: component {:>10} bytes | build {:>6.1} s | cold compile {:>8.1} ms | cached load {:>6.1} ms | warm decision {:>4} µs",
        size,
        build_time.as_secs_f64(),
        loaded(&cold).as_secs_f64() * 1e3,
        loaded(&cached).as_secs_f64() * 1e3,
        warm_us
    );
    eprintln!("{figures}");
    // Kept beside the test binaries too, to read after a run without --nocapture.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-kit");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join(format!("{lang}.txt")), figures + "\n").unwrap();
}

#[test]
fn a_rust_plugin_from_new_to_hot_reload() {
    outsider_flow("rust", "src/lib.rs");
}

#[test]
fn a_python_plugin_from_new_to_hot_reload() {
    outsider_flow("python", "app.py");
}

#[test]
fn a_javascript_plugin_from_new_to_hot_reload_and_an_import_the_host_lacks_named() {
    outsider_flow("js", "policy.js");
    // componentize-js's defaults import wasi:http: refused, with the interface named.
    let work = tempfile::tempdir().unwrap();
    let project = new_project(work.path(), "kit-http", "js");
    let manifest = project.join("package.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace(" --disable http fetch-event", "")).unwrap();
    build("js", &project);
    let out = arges(
        &[
            "plugin",
            "check",
            &project.join("kit-http.wasm").display().to_string(),
        ],
        work.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("imports wasi:http/types@")
            && err.contains("which the host does not provide")
            && err.contains("--disable http fetch-event"),
        "{err}"
    );
}

#[test]
fn a_component_built_against_the_previous_contract_version_loads() {
    // The Rust starter with its contract set back to 0.1.0.
    let work = tempfile::tempdir().unwrap();
    let project = new_project(work.path(), "kit-v010", "rust");
    let wit = project.join("wit/plugin.wit");
    let text = std::fs::read_to_string(&wit).unwrap();
    let current = format!("package arges:plugin@{};", arges::plugins::CONTRACT_VERSION);
    assert!(text.contains(&current));
    assert_ne!(
        arges::plugins::CONTRACT_VERSION,
        "0.1.0",
        "the host speaks a newer version"
    );
    std::fs::write(&wit, text.replace(&current, "package arges:plugin@0.1.0;")).unwrap();
    build("rust", &project);
    let wasm = project.join("kit-v010.wasm");
    let bytes = std::fs::read(&wasm).unwrap();
    let imports_old = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(imports_old("arges:plugin/log@0.1.0"), "built against 0.1.0");
    let checked = ok(
        &arges(
            &["plugin", "check", &wasm.display().to_string()],
            work.path(),
        ),
        "plugin check",
    );
    assert!(
        checked.contains("arges:plugin/boot-policy@0.1.0 (exports decide; this appliance speaks"),
        "{checked}"
    );
    let cases = project.join("cases.yaml").display().to_string();
    let tested = ok(
        &arges(
            &[
                "plugin",
                "test",
                &wasm.display().to_string(),
                "--cases",
                &cases,
            ],
            work.path(),
        ),
        "plugin test",
    );
    assert!(tested.contains("4 cases: 4 passed, 0 failed"), "{tested}");
}
