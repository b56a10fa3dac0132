//! proxyDHCP on loopback: the PXE port (4011) answers a ProxyDHCP REQUEST by unicast, and
//! garbage is counted, never fatal. (Broadcast answers on port 67 need an interface of
//! their own: the QEMU tests in `tests/netboot` cover them.)

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

use test_support::Appliance;

fn pxe_request(xid: u32, arch: u16, user_class: Option<&[u8]>) -> Vec<u8> {
    pxe_request_of([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc], xid, arch, user_class)
}

/// A PXE client's ProxyDHCP REQUEST (to the PXE port) from the machine with `mac`.
pub(crate) fn pxe_request_of(
    mac: [u8; 6],
    xid: u32,
    arch: u16,
    user_class: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::Request));
    o.insert(DhcpOption::ClassIdentifier(
        format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
    ));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture(arch)));
    o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    if let Some(uc) = user_class {
        o.insert(DhcpOption::UserClass(uc.to_vec()));
    }
    m.to_vec().unwrap()
}

pub(crate) fn exchange(sock: &UdpSocket, to: std::net::SocketAddr, pkt: &[u8]) -> Message {
    sock.send_to(pkt, to).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).expect("a proxyDHCP answer");
    assert_eq!(from, to, "answered from the port asked");
    Message::from_bytes(&buf[..n]).unwrap()
}

#[test]
fn pxe_port_acks_with_the_boot_file_for_the_architecture() {
    let a =
        Appliance::start("[dhcp]\nmode = \"proxy\"\nlisten = []\npxe_listen = [\"127.0.0.1:0\"]\n");
    let to = a.dhcp.expect("a proxyDHCP socket");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let m = exchange(&sock, to, &pxe_request(7, 7, None));
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 7);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.siaddr(), Ipv4Addr::LOCALHOST, "we are the boot server");
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED, "a proxy leases nothing");
    assert_eq!(
        m.opts().get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(b"ipxe.efi".to_vec()))
    );

    // iPXE gets the boot script on the HTTP address it can reach.
    let m = exchange(&sock, to, &pxe_request(8, 0, Some(b"iPXE")));
    let want = format!(
        "http://127.0.0.1:{}/boot.ipxe?uuid=${{uuid}}&mac=${{netX/mac}}&arch=${{buildarch}}",
        a.http.port()
    );
    assert_eq!(
        m.opts().get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(want.into_bytes()))
    );

    // Garbage and non-PXE clients get nothing, and the server keeps answering.
    for junk in [
        vec![],
        vec![0u8; 3],
        vec![0xff; 1400],
        pxe_request(9, 7, None)[..200].to_vec(),
    ] {
        sock.send_to(&junk, to).unwrap();
    }
    let m = exchange(&sock, to, &pxe_request(10, 9, None));
    assert_eq!(
        m.xid(),
        10,
        "the first answer after the garbage is to the good request"
    );
    let metrics = a.wait_metric("arges_dhcp_requests_total{result=\"malformed\"}");
    assert!(
        metrics.contains("arges_dhcp_requests_total{result=\"answered\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arges_dhcp_replies_total{client=\"ipxe\",firmware=\"bios\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_request_naming_a_relay_the_config_does_not_name_gets_no_answer() {
    let a = Appliance::start(
        "[dhcp]\nmode = \"proxy\"\nlisten = []\npxe_listen = [\"127.0.0.1:0\"]\nrelays = [\"127.0.0.77\"]\n",
    );
    let to = a.dhcp.expect("a proxyDHCP socket");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A forged relay (on loopback, so a wrong answer could not leave this machine):
    // no reply is sent to it, and a flood of them is one counter, not a log flood.
    let forged = |xid| {
        let mut m = Message::from_bytes(&pxe_request(xid, 7, None)).unwrap();
        m.set_giaddr(Ipv4Addr::new(127, 0, 0, 66));
        m.to_vec().unwrap()
    };
    for xid in 100..300 {
        sock.send_to(&forged(xid), to).unwrap();
    }
    // The flood may overrun the socket's buffer (the kernel drops the rest, as it
    // would in the field); the honest client asks until it is answered, as PXE ROMs do.
    a.wait_metric("arges_dhcp_requests_total{result=\"relay_refused\"}");
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut honest = 0;
    let answered = (0..5).find_map(|_| {
        honest += 1;
        sock.send_to(&pxe_request(11, 7, None), to).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        Some(Message::from_bytes(&buf[..n]).unwrap())
    });
    let m = answered.expect("the honest request is answered");
    assert_eq!(m.xid(), 11, "no forged request was answered");
    // Every answer went to an honest request (a late answer may have crossed a resend).
    // The counter moves just after the reply is sent: wait for it.
    let metrics = a.wait_metric("arges_dhcp_requests_total{result=\"answered\"}");
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("arges_dhcp_requests_total{result=\"answered\"} "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(
        (1..=honest).contains(&count),
        "{count} answers to {honest} honest requests: {metrics}"
    );
    let refusals = a.log().matches("proxyDHCP reply not sent").count();
    assert!(
        (1..=10).contains(&refusals),
        "refusals are logged at a bounded rate: {refusals} lines"
    );
}

/// A machine's boot as the appliance witnesses it, from a distinct loopback address: the
/// PXE ROM's proxyDHCP request, its TFTP read (known only by address until iPXE asks for
/// its script with the MAC), the script, the kernel fetch and the registration, in order
/// with their figures; in the API by server and by MAC, and in the CLI.
#[test]
fn a_boot_is_witnessed_step_by_step_and_shown_by_server_and_by_mac() {
    use test_support::{ADMIN_TOKEN, Registration, curl, param, random_file};
    let mut a =
        Appliance::start("[dhcp]\nmode = \"proxy\"\nlisten = []\npxe_listen = [\"127.0.0.1:0\"]\n");
    let machine = "127.0.0.7";
    let reg = Registration::numbered(1);
    let mac = "52:54:00:00:00:01";
    let sock = UdpSocket::bind((machine, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let m = exchange(
        &sock,
        a.dhcp.expect("a proxyDHCP socket"),
        &pxe_request_of([0x52, 0x54, 0, 0, 0, 1], 9, 7, None),
    );
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));

    let rom = random_file(&a.tftp_root().join("ipxe.efi"), 300_000, 9);
    let tftp = |from: &str| {
        let url = format!("tftp://{}/ipxe.efi", a.tftp);
        let (_, body, _) = curl(&["--interface", from, "--tftp-blksize", "1024", &url]);
        assert_eq!(body.len(), rom.len(), "TFTP from {from}");
    };
    tftp(machine);
    // Another address that never goes further: shown by address.
    tftp("127.0.0.8");
    let api = |path: &str| {
        let (code, body) = a.request("GET", path, Some(ADMIN_TOKEN), b"");
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    // The request on the PXE port came from the machine's address: its TFTP read is
    // the machine's already. The other address is known by address alone.
    let pending = api("/api/v1/boots/ip:127.0.0.8");
    assert_eq!(pending["boots"][0]["steps"][0]["step"], "tftp", "{pending}");
    assert_eq!(pending["mac"], serde_json::Value::Null, "{pending}");

    let (code, script) = a.boot_script(reg.uuid(), mac, machine);
    assert_eq!(code, 200, "{script}");
    let kernel = script
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .and_then(|l| l.split_whitespace().next())
        .expect("a kernel line")
        .to_string();
    let (code, kernel_body, _) = curl(&["--interface", machine, &kernel]);
    assert_eq!(code, 200, "{kernel}");
    // The machine, not registered yet, shows by MAC with the UUID its script named.
    let unknown = api(&format!("/api/v1/boots/{mac}"));
    assert_eq!(unknown["uuid"], reg.uuid(), "{unknown}");
    assert_eq!(unknown["boots"][0]["steps"][1]["step"], "tftp", "{unknown}");

    // The agent registers from the machine's address with the secret its boot got.
    let secret = param(&script, "arges.token");
    let body = String::from_utf8(reg.body()).unwrap();
    let (code, resp, _) = curl(&[
        "--interface",
        machine,
        "-H",
        &format!("Authorization: Bearer {secret}"),
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body,
        &a.url("/api/v1/register"),
    ]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&resp));

    let boots = api(&format!("/api/v1/servers/{}/boots", reg.uuid()));
    let boots = boots["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 1, "one boot: {boots:#?}");
    let steps = boots[0]["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["dhcp", "tftp", "boot_script", "fetch", "registered"],
        "{steps:#?}"
    );
    assert_eq!(steps[0]["client"], "pxe");
    assert_eq!(steps[0]["boot_file"], "ipxe.efi");
    assert_eq!(steps[1]["file"], "ipxe.efi");
    assert_eq!(steps[1]["bytes"], rom.len());
    assert_eq!(steps[1]["blksize"], 1024);
    assert_eq!(steps[1]["outcome"], "complete");
    assert_eq!(steps[2]["action"], "discover");
    assert_eq!(steps[2]["by"], "built-in");
    assert_eq!(steps[3]["status"], 200);
    assert_eq!(steps[3]["bytes"], kernel_body.len());
    let mut at = 0;
    for s in steps {
        let t = s["at_ms"].as_u64().unwrap();
        assert!(t >= at, "in time order: {steps:#?}");
        at = t;
    }
    // Every machine witnessed, the address that went no further among them.
    let all = api("/api/v1/boots");
    let keys: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{}/{}", m["mac"], m["address"]))
        .collect();
    assert!(keys.contains(&"null/\"127.0.0.8\"".to_string()), "{keys:?}");

    let out = test_support::run(
        std::process::Command::new(test_support::bin())
            .args(["server", "--url", &a.url(""), "--token", ADMIN_TOKEN])
            .args(["boots", reg.uuid()]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        "proxyDHCP answered pxe",
        "TFTP ipxe.efi complete: 300000 bytes",
        "/boot.ipxe: discover (decided by built-in)",
        "registered as",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }

    // A restart keeps the boots, and the address still leads to the machine.
    let before = api(&format!("/api/v1/servers/{}/boots", reg.uuid()));
    a.restart();
    let api = |path: &str| {
        let (code, body) = a.request("GET", path, Some(ADMIN_TOKEN), b"");
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    let after = api(&format!("/api/v1/servers/{}/boots", reg.uuid()));
    assert_eq!(before, after, "the boots after a restart");
    // A TFTP read knows only the address: it lands on the machine all the same.
    let url = format!("tftp://{}/ipxe.efi", a.tftp);
    let (_, body, _) = curl(&["--interface", machine, "--tftp-blksize", "1024", &url]);
    assert_eq!(body.len(), rom.len());
    let after = api(&format!("/api/v1/servers/{}/boots", reg.uuid()));
    let steps = after["boots"][0]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 6, "{after}");
    assert_eq!(steps.last().unwrap()["step"], "tftp", "{after}");
}
