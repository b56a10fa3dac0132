//! IPMI over LAN against OpenIPMI's `ipmi_sim` on loopback: sessions, power, the next
//! boot device, failures that must be told apart, and a slow, lossy link. ipmitool checks
//! the simulator's state independently. Power through the appliance, its drivers and
//! many BMCs at once is in `power.rs`.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use arges::bmc::ipmi::{IpmiClient, IpmiError, IpmiTarget};
use arges::bmc::rmcp::Suite;
use arges::bmc::{BootDevice, PowerAction};

use crate::chassis;
use test_support::ipmi_sim::Bmc;
use test_support::runtime;

#[test]
fn power_and_next_boot_through_ipmi_sim() {
    let bmc = Bmc::start();
    let client = IpmiClient::default();
    let rt = runtime();
    let (suite, before, after) = rt
        .block_on(client.with_session(&bmc.target(), async |s| {
            let before = chassis::power_is_on(s).await?;
            chassis::set_boot_device(s, BootDevice::Pxe, false, true).await?;
            chassis::set_power(s, PowerAction::On).await?;
            let after = chassis::power_is_on(s).await?;
            Ok((s.suite(), before, after))
        }))
        .unwrap();
    // ipmi_sim has no suite 17: the client fell back to 3.
    assert_eq!(suite, Suite::Three);
    assert_eq!((before, after), (false, true));
    assert!(bmc.ipmitool_says_on(), "ipmitool disagrees");
    let asked = bmc.requests();
    // The simulator keeps the device only (it drops the persistent and EFI bits): the
    // bits we sent are checked in the unit tests of `chassis::boot_flags`.
    let boot = asked.find("boot pxe").expect("PXE asked for");
    let power = asked.find("power 1").expect("power on asked for");
    assert!(boot < power, "the boot device goes first: {asked}");

    rt.block_on(client.with_session(&bmc.target(), async |s| {
        chassis::set_power(s, PowerAction::Off).await
    }))
    .unwrap();
    assert!(!bmc.ipmitool_says_on());
    rt.block_on(client.with_session(&bmc.target(), async |s| {
        chassis::set_power(s, PowerAction::Cycle).await
    }))
    .unwrap();
    rt.block_on(client.with_session(&bmc.target(), async |s| {
        chassis::set_boot_device(s, BootDevice::Disk, true, false).await
    }))
    .unwrap();
    assert!(
        bmc.requests().contains("boot default"),
        "{}",
        bmc.requests()
    );
}

#[test]
fn wrong_password_absent_and_silent_bmcs_fail_each_with_its_reason() {
    let bmc = Bmc::start();
    let client = IpmiClient::default();
    let rt = runtime();
    let mut wrong = bmc.target();
    wrong.password = "not-the-password".into();
    let e = rt
        .block_on(client.with_session(&wrong, async |_| Ok(())))
        .unwrap_err();
    assert!(matches!(e, IpmiError::Credentials { .. }), "{e}");
    assert!(e.to_string().contains("admin"), "{e}");
    assert!(
        !e.to_string().contains("not-the-password"),
        "no password in errors: {e}"
    );
    let mut nobody = bmc.target();
    nobody.user = "nobody".into();
    let e = rt
        .block_on(client.with_session(&nobody, async |_| Ok(())))
        .unwrap_err();
    assert!(matches!(e, IpmiError::Credentials { .. }), "{e}");

    // Nothing listens: refused at once.
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let e = rt
        .block_on(client.with_session(
            &IpmiTarget::new(closed_addr, "admin", "password"),
            async |_| Ok(()),
        ))
        .unwrap_err();
    assert_eq!(e, IpmiError::Unreachable(closed_addr));

    // Something listens and never answers: resends, then a timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut t = IpmiTarget::new(silent.local_addr().unwrap(), "admin", "password");
    t.timeout = Duration::from_millis(100);
    t.retries = 2;
    let e = rt
        .block_on(client.with_session(&t, async |_| Ok(())))
        .unwrap_err();
    assert_eq!(e, IpmiError::Timeout(t.addr));
    silent
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    let mut got = 0;
    while silent.recv(&mut buf).is_ok() {
        got += 1;
    }
    assert_eq!(
        got, 3,
        "the Open Session Request was sent, then resent twice"
    );

    // The real BMC still serves after all that.
    let on = rt
        .block_on(client.with_session(&bmc.target(), async |s| chassis::power_is_on(s).await))
        .unwrap();
    assert!(!on);
}

/// A UDP relay in front of a BMC that delays every datagram and drops every `drop_every`th
/// one from the client: a slow, lossy management network.
pub fn lossy_relay(bmc: SocketAddr, delay: Duration, drop_every: usize) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = front.local_addr().unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(bmc).unwrap();
    let client: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>> = Default::default();
    let (f2, b2, c2) = (
        front.try_clone().unwrap(),
        back.try_clone().unwrap(),
        client.clone(),
    );
    // Bounded: the relays stop after a minute of silence (the test is long over by then).
    for s in [&front, &back] {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n = 0usize;
        while let Ok((len, from)) = front.recv_from(&mut buf) {
            *client.lock().unwrap() = Some(from);
            n += 1;
            if n.is_multiple_of(drop_every) {
                continue;
            }
            std::thread::sleep(delay);
            let _ = back.send(&buf[..len]);
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(len) = b2.recv(&mut buf) {
            std::thread::sleep(delay);
            if let Some(to) = *c2.lock().unwrap() {
                let _ = f2.send_to(&buf[..len], to);
            }
        }
    });
    addr
}

#[test]
fn a_slow_lossy_link_is_ridden_out_by_resending() {
    let bmc = Bmc::start();
    // 150 ms each way and every third packet lost, against a 500 ms resend timer.
    let relay = lossy_relay(bmc.addr, Duration::from_millis(150), 3);
    let mut t = IpmiTarget::new(relay, "admin", "password");
    t.timeout = Duration::from_millis(500);
    t.retries = 4;
    let client = IpmiClient::default();
    let rt = runtime();
    let on = rt
        .block_on(client.with_session(&t, async |s| {
            chassis::set_boot_device(s, BootDevice::Pxe, false, true).await?;
            chassis::set_power(s, PowerAction::On).await?;
            chassis::power_is_on(s).await
        }))
        .unwrap();
    assert!(on);
    assert!(bmc.ipmitool_says_on());
    // The session was closed despite the losses.
    let active = rt
        .block_on(client.with_session(&bmc.target(), async |s| chassis::active_sessions(s).await))
        .unwrap();
    assert_eq!(active, 1);
}
