//! Programs the tests run: peers found on `PATH` (or the test fails with the reason),
//! commands run inside a network namespace a test made, free ports, and waiting for a
//! condition with a bound.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails the test with a clear reason when a peer program is missing.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{program}` (run the README's test command, which installs it)"
    );
}

/// Runs a command and returns its output; panics with the reason when it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `program`, run inside network namespace `netns` when there is one (`ip netns exec`).
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Waits (at most `secs`) until `ready` says a started program is serving; fails with
/// `log()` if the program exits first or the time runs out.
pub fn wait_started(
    child: &mut Child,
    what: &str,
    secs: u64,
    mut ready: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}:\n{}", log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what} did not start in {secs} s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port nothing listens on, below the kernel's ephemeral range (32768 and up,
/// where outgoing connections draw their source ports from), so no client connection
/// can take it between now and the moment its server binds it (a kernel-chosen `:0`
/// port could be, and was). Each port is handed out once per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 500) * 20;
    for _ in 0..12_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let port = port as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `secs`.
pub fn eventually<T>(secs: u64, what: &str, f: impl FnMut() -> Option<T>) -> T {
    within(secs, what, f, String::new)
}

/// Like [`eventually`], and on timeout the panic shows `state()` (objects, logs).
pub fn within<T>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    state: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            panic!("{what}: not within {secs} s\n{}", state());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `max` bytes of a log file, headed by its name, for failure messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let cut = text.len().saturating_sub(max);
    let cut = (cut..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    format!("--- {name} ---\n{}", &text[cut..])
}

/// Runs the repository's script `script` with `args` and `env` (its output quiet); the
/// test fails if it does.
pub fn run_script(script: &str, args: &[&OsStr], env: &[(&str, &OsStr)]) {
    let ok = Command::new("bash")
        .arg(repo().join(script))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{script} {args:?} failed");
}

/// The repository's root (for its deploy files, test data and built plugins).
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The `arges` binary of this build: `ARGES_BIN`, else the one cargo built beside the
/// running test or example (`target/<profile>/arges`).
pub fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("ARGES_BIN") {
            return PathBuf::from(b);
        }
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/<test>-<hash>, or target/<profile>/examples/<name>.
        let profile = exe
            .parent()
            .and_then(Path::parent)
            .expect("a test binary inside target/<profile>/");
        let bin = profile.join("arges");
        assert!(
            bin.is_file(),
            "{} is missing: cargo builds it for the arges package's tests (or set ARGES_BIN)",
            bin.display()
        );
        bin
    })
}
