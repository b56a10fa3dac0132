//! SIGTERM, as systemd and the kubelet stop the appliance: no new work is taken, what is
//! in flight (a kernel download over HTTP, an iPXE binary over TFTP) finishes, and the
//! drain deadline cuts what would not, so a stop never hangs.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{Appliance, random_file};

/// A curl started in the background, writing to `out`.
fn slow_curl(args: &[&str], out: &std::path::Path) -> Child {
    Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(out)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl")
}

/// Waits (at most 30 s) until `out` holds some bytes: the transfer is under way.
fn wait_started(out: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(out).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "the transfer never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_lets_transfers_in_flight_finish_and_takes_no_new_work() {
    let mut a = Appliance::start("");
    let kernel = random_file(&a.data().join("assets/talos/vmlinuz"), 24 << 20, 7);
    let ipxe = random_file(&a.tftp_root().join("undionly.kpxe"), 6 << 20, 8);
    let out = a.dir.path().join("got");
    let http_out = out.join("vmlinuz");
    let tftp_out = out.join("undionly.kpxe");
    std::fs::create_dir_all(&out).unwrap();
    // Both take seconds at these rates: the stop lands in the middle of each.
    let mut http = slow_curl(
        &["--limit-rate", "6M", &a.url("/env/talos/vmlinuz")],
        &http_out,
    );
    let tftp_url = format!("tftp://{}/undionly.kpxe", a.tftp);
    let mut tftp = slow_curl(
        &["--limit-rate", "2M", "--tftp-blksize", "1468", &tftp_url],
        &tftp_out,
    );
    wait_started(&http_out);
    wait_started(&tftp_out);
    let http_addr = a.http;
    let status = a.terminate();
    assert!(status.success(), "{status}\n{}", a.log());
    // Nothing new was taken once the stop began: the listener is gone.
    assert!(
        std::net::TcpStream::connect(http_addr).is_err(),
        "a new connection was accepted after the stop"
    );
    let http = http.wait().unwrap();
    let tftp = tftp.wait().unwrap();
    assert!(http.success() && tftp.success(), "{http} {tftp}");
    assert!(
        std::fs::read(&http_out).unwrap() == kernel,
        "the kernel arrived whole"
    );
    assert!(
        std::fs::read(&tftp_out).unwrap() == ipxe,
        "the iPXE binary arrived whole"
    );
    let log = a.log();
    assert!(
        log.contains("drained: all work in flight finished") && log.contains("in_flight=2"),
        "{log}"
    );
}

#[test]
fn the_drain_deadline_cuts_what_would_not_finish() {
    let top = format!(
        "drain_secs = 1\n{}",
        test_support::appliance::NO_RATE_LIMITS
    );
    let mut a = Appliance::start_in(Appliance::prepare_with(&top, ""), &[]);
    let len = 64 << 20;
    random_file(&a.data().join("assets/talos/vmlinuz"), len, 9);
    // A client that asks for a kernel, reads a little, then stalls: it would never
    // finish on its own.
    let mut stalled = std::net::TcpStream::connect(a.http).unwrap();
    stalled
        .write_all(b"GET /env/talos/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = vec![0u8; 64 << 10];
    stalled.read_exact(&mut first).unwrap();
    let status = a.terminate();
    assert!(status.success(), "{status}\n{}", a.log());
    // The appliance is gone; what was sent before the cut is all there is.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        first.len() + rest.len() < len,
        "the download cannot have finished"
    );
    let log = a.log();
    assert!(
        log.contains("drain deadline reached") && log.contains("cut=1"),
        "{log}"
    );
    assert!(
        log.contains("HTTP connection cut at the drain deadline"),
        "{log}"
    );
}
