//! What proxyDHCP answers: the pure part, from request bytes to reply bytes.
//!
//! A request is answered only when it comes from a network-boot client (option 60 starts
//! with `PXEClient` or `HTTPClient`). The boot file is picked by the client's architecture
//! (option 93, or the `Arch:` field of option 60 when 93 is missing): firmware PXE gets the
//! matching iPXE binary over TFTP, UEFI HTTP boot gets the same binary as an `http://` URL,
//! and iPXE itself (user class `iPXE`, or a configured marker) gets the `/boot.ipxe` URL, so
//! it never loops back into loading iPXE. The answer carries no address (`yiaddr` is 0):
//! the site's DHCP server leases addresses, we only say what to boot.

use std::net::Ipv4Addr;

use dhcproto::v4::{
    Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Decodable, Encodable};

use crate::config::{BootFiles, DhcpConfig};

/// Smallest reply we send: BOOTP's 300 bytes, since some PXE ROMs drop shorter packets.
const MIN_REPLY: usize = 300;
/// The BOOTP `file` field holds 128 bytes with its terminating NUL.
const FILE_FIELD: usize = 127;
/// PXE vendor sub-option 6 (discovery control): bit 3 = "boot the file named here, skip
/// boot-server discovery and menus".
const PXE_DISCOVERY_CONTROL: u8 = 6;
const PXE_BOOT_FILE_ONLY: u8 = 0x08;

/// Why a request got no answer (each is a metric label).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("malformed DHCP packet: {0}")]
    Malformed(String),
    #[error("not a BOOTREQUEST")]
    NotRequest,
    #[error("not a network-boot client")]
    NotPxe,
    #[error("DHCP message type {0} is not answered by a proxy")]
    MessageType(u8),
    #[error("request is for another server")]
    OtherServer,
    #[error("client architecture {0} has no boot file")]
    Architecture(u16),
}

impl Ignored {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Ignored::Malformed(_) => "malformed",
            Ignored::NotRequest => "not_request",
            Ignored::NotPxe => "not_pxe",
            Ignored::MessageType(_) => "message_type",
            Ignored::OtherServer => "other_server",
            Ignored::Architecture(_) => "architecture",
        }
    }
}

/// How the client boots over the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Firmware PXE: fetches a file over TFTP.
    Pxe,
    /// UEFI HTTP boot: fetches a URL.
    Http,
    /// iPXE already running: gets the boot-script URL.
    Ipxe,
}

impl ClientKind {
    /// Name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Pxe => "pxe",
            ClientKind::Http => "http",
            ClientKind::Ipxe => "ipxe",
        }
    }
}

/// Firmware families we hand a boot file to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    UefiI386,
    UefiX86_64,
    UefiArm64,
}

impl Firmware {
    /// Name for logs and metrics (the keys of `[dhcp.boot_files]`).
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::UefiI386 => "uefi_i386",
            Firmware::UefiX86_64 => "uefi_x86_64",
            Firmware::UefiArm64 => "uefi_arm64",
        }
    }

    /// The iPXE binary configured for this family.
    pub fn file(self, files: &BootFiles) -> &str {
        match self {
            Firmware::Bios => &files.bios,
            Firmware::UefiI386 => &files.uefi_i386,
            Firmware::UefiX86_64 => &files.uefi_x86_64,
            Firmware::UefiArm64 => &files.uefi_arm64,
        }
    }

    /// The firmware family and whether it boots over HTTP, by RFC 4578 / IANA architecture.
    fn from_arch(arch: u16) -> Option<(Firmware, bool)> {
        Some(match Architecture(arch) {
            Architecture::X86_Bios => (Firmware::Bios, false),
            Architecture::X86 => (Firmware::UefiI386, false),
            Architecture::X64 | Architecture::BC => (Firmware::UefiX86_64, false),
            Architecture::Arm64 => (Firmware::UefiArm64, false),
            Architecture::X86_Http => (Firmware::UefiI386, true),
            Architecture::X64_Http | Architecture::BC_Http => (Firmware::UefiX86_64, true),
            Architecture::Arm64_Http => (Firmware::UefiArm64, true),
            _ => return None,
        })
    }
}

/// A network-boot client, as its request describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootClient {
    pub mac: String,
    pub arch: u16,
    pub firmware: Firmware,
    pub kind: ClientKind,
}

/// Where a request arrived and whom it may be answered as.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Our address on the interface the request came in on (the server identifier).
    pub server: Ipv4Addr,
    /// It came to the PXE port (4011), where requests are addressed to us alone.
    pub pxe_port: bool,
}

/// A reply ready to send.
#[derive(Debug, Clone)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub client: BootClient,
    /// The boot file or URL handed out.
    pub boot_file: String,
    /// The request was relayed: answer the relay (`giaddr`), not the client.
    pub relay: Option<Ipv4Addr>,
    /// The client already has an address (`ciaddr`).
    pub client_addr: Option<Ipv4Addr>,
    pub message: MessageType,
}

fn option_bytes(msg: &Message, code: OptionCode) -> Option<Vec<u8>> {
    match msg.opts().get(code)? {
        DhcpOption::ClassIdentifier(b)
        | DhcpOption::UserClass(b)
        | DhcpOption::ClientMachineIdentifier(b) => Some(b.clone()),
        DhcpOption::Unknown(u) => Some(u.data().to_vec()),
        _ => None,
    }
}

/// The user-class strings, read both as RFC 3004 (length-prefixed) and as one raw string,
/// which is what iPXE sends.
fn user_classes(raw: &[u8]) -> Vec<String> {
    let mut out = vec![String::from_utf8_lossy(raw).into_owned()];
    let mut rest = raw;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if len == 0 || len > tail.len() {
            break;
        }
        out.push(String::from_utf8_lossy(&tail[..len]).into_owned());
        rest = &tail[len..];
    }
    out
}

/// The `Arch:NNNNN` field of a PXE vendor class (`PXEClient:Arch:00007:UNDI:003016`).
fn arch_from_vendor_class(vci: &str) -> Option<u16> {
    let mut parts = vci.split(':');
    while let Some(p) = parts.next() {
        if p == "Arch" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Classifies a decoded request; `None` if it is not a network-boot client.
pub fn classify(msg: &Message, ipxe_markers: &[String]) -> Result<BootClient, Ignored> {
    if msg.opcode() != Opcode::BootRequest {
        return Err(Ignored::NotRequest);
    }
    let vci = option_bytes(msg, OptionCode::ClassIdentifier)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let http_client = vci.starts_with("HTTPClient");
    if !(vci.starts_with("PXEClient") || http_client) {
        return Err(Ignored::NotPxe);
    }
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => a.0,
        _ => arch_from_vendor_class(&vci).unwrap_or(0),
    };
    let (firmware, http_arch) = Firmware::from_arch(arch).ok_or(Ignored::Architecture(arch))?;
    let ipxe = option_bytes(msg, OptionCode::UserClass)
        .map(|uc| {
            user_classes(&uc)
                .iter()
                .any(|c| ipxe_markers.iter().any(|m| m == c))
        })
        .unwrap_or(false);
    let kind = if ipxe {
        ClientKind::Ipxe
    } else if http_client || http_arch {
        ClientKind::Http
    } else {
        ClientKind::Pxe
    };
    let mac = msg
        .chaddr()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(BootClient {
        mac,
        arch,
        firmware,
        kind,
    })
}

/// Decodes a request and builds the reply, or says why there is none.
///
/// `http_base` is the appliance's URL as machines reach it (`http://10.0.0.2:8080`).
pub fn answer(
    packet: &[u8],
    arrival: Arrival,
    http_base: &str,
    config: &DhcpConfig,
) -> Result<Reply, Ignored> {
    let req = Message::from_bytes(packet).map_err(|e| Ignored::Malformed(e.to_string()))?;
    if usize::from(req.hlen()) > 16 {
        return Err(Ignored::Malformed(format!(
            "hardware address length {}",
            req.hlen()
        )));
    }
    let client = classify(&req, &config.ipxe_user_classes)?;
    let message = match req.opts().msg_type() {
        Some(MessageType::Discover) => MessageType::Offer,
        Some(MessageType::Request) | Some(MessageType::Inform) => {
            // On port 67 a REQUEST is normally meant for the site's server; answer only
            // those addressed to us. Port 4011 is ours alone.
            let to_us = match req.opts().get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(ip)) => *ip == arrival.server,
                _ => arrival.pxe_port,
            };
            if !to_us {
                return Err(Ignored::OtherServer);
            }
            MessageType::Ack
        }
        Some(other) => return Err(Ignored::MessageType(u8::from(other))),
        None => return Err(Ignored::Malformed("no message type".into())),
    };
    let boot_file = boot_file(&client, http_base, config);
    let mut reply = Message::new_with_id(
        req.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        arrival.server,
        req.giaddr(),
        req.chaddr(),
    );
    reply
        .set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_flags(req.flags())
        .set_sname_str(arrival.server.to_string());
    if boot_file.len() <= FILE_FIELD {
        reply.set_fname_str(&boot_file);
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(message));
    opts.insert(DhcpOption::ServerIdentifier(arrival.server));
    opts.insert(DhcpOption::ClassIdentifier(
        if client.kind == ClientKind::Http {
            b"HTTPClient".to_vec()
        } else {
            b"PXEClient".to_vec()
        },
    ));
    // PXE requires the client's machine identifier echoed back.
    if let Some(guid) = option_bytes(&req, OptionCode::ClientMachineIdentifier) {
        opts.insert(DhcpOption::ClientMachineIdentifier(guid));
    }
    if client.kind == ClientKind::Pxe {
        opts.insert(DhcpOption::VendorExtensions(vec![
            PXE_DISCOVERY_CONTROL,
            1,
            PXE_BOOT_FILE_ONLY,
            255,
        ]));
    }
    opts.insert(DhcpOption::BootfileName(boot_file.clone().into_bytes()));
    if client.kind == ClientKind::Ipxe {
        // iPXE's "no-pxedhcp" (175.176): this answer is complete, do not wait for or ask
        // another ProxyDHCP server.
        opts.insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::Unknown(175),
            vec![176, 1, 1],
        )));
    }
    let mut bytes = reply
        .to_vec()
        .map_err(|e| Ignored::Malformed(format!("cannot encode the reply: {e}")))?;
    if bytes.len() < MIN_REPLY {
        bytes.resize(MIN_REPLY, 0);
    }
    let nonzero = |ip: Ipv4Addr| (!ip.is_unspecified()).then_some(ip);
    Ok(Reply {
        bytes,
        client,
        boot_file,
        relay: nonzero(req.giaddr()),
        client_addr: nonzero(req.ciaddr()),
        message,
    })
}

/// The file (TFTP) or URL (HTTP boot, iPXE) a client gets.
fn boot_file(client: &BootClient, http_base: &str, c: &DhcpConfig) -> String {
    let file = client.firmware.file(&c.boot_files);
    match client.kind {
        ClientKind::Pxe => file.to_string(),
        ClientKind::Http => format!("{http_base}/boot/{file}"),
        ClientKind::Ipxe => format!("{http_base}{}", c.boot_script),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn config() -> DhcpConfig {
        Config::defaults(&Overrides::default()).unwrap().dhcp
    }

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const BASE: &str = "http://10.77.0.2:8080";

    /// A request as firmware sends it.
    pub(crate) fn request(
        msg_type: MessageType,
        vci: &str,
        arch: Option<u16>,
        user_class: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        );
        m.set_flags(dhcproto::v4::Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(msg_type));
        if !vci.is_empty() {
            o.insert(DhcpOption::ClassIdentifier(vci.as_bytes().to_vec()));
        }
        if let Some(a) = arch {
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture(a)));
        }
        if let Some(uc) = user_class {
            o.insert(DhcpOption::UserClass(uc.to_vec()));
        }
        o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
        m.to_vec().unwrap()
    }

    fn arrival(pxe_port: bool) -> Arrival {
        Arrival {
            server: SERVER,
            pxe_port,
        }
    }

    fn decoded(r: &Reply) -> Message {
        Message::from_bytes(&r.bytes).unwrap()
    }

    #[test]
    fn boot_file_by_architecture() {
        let c = config();
        for (vci, arch, uc, kind, want) in [
            (
                "PXEClient:Arch:00000:UNDI:002001",
                Some(0),
                None,
                ClientKind::Pxe,
                "undionly.kpxe".to_string(),
            ),
            (
                "PXEClient:Arch:00007:UNDI:003000",
                Some(7),
                None,
                ClientKind::Pxe,
                "ipxe.efi".into(),
            ),
            (
                "PXEClient:Arch:00009:UNDI:003000",
                Some(9),
                None,
                ClientKind::Pxe,
                "ipxe.efi".into(),
            ),
            (
                "PXEClient:Arch:00011:UNDI:003000",
                Some(11),
                None,
                ClientKind::Pxe,
                "ipxe-arm64.efi".into(),
            ),
            (
                "HTTPClient:Arch:00016:UNDI:003001",
                Some(16),
                None,
                ClientKind::Http,
                format!("{BASE}/boot/ipxe.efi"),
            ),
            (
                "HTTPClient:Arch:00019:UNDI:003001",
                Some(19),
                None,
                ClientKind::Http,
                format!("{BASE}/boot/ipxe-arm64.efi"),
            ),
            // No option 93: the vendor class's Arch field decides.
            (
                "PXEClient:Arch:00007:UNDI:003000",
                None,
                None,
                ClientKind::Pxe,
                "ipxe.efi".into(),
            ),
            (
                "PXEClient:Arch:00000:UNDI:002001",
                Some(0),
                Some(b"iPXE".as_slice()),
                ClientKind::Ipxe,
                format!("{BASE}/boot.ipxe?uuid=${{uuid}}&mac=${{netX/mac}}&arch=${{buildarch}}"),
            ),
            // RFC 3004 encoding of the same user class.
            (
                "PXEClient:Arch:00007:UNDI:003000",
                Some(7),
                Some(b"\x04iPXE".as_slice()),
                ClientKind::Ipxe,
                format!("{BASE}/boot.ipxe?uuid=${{uuid}}&mac=${{netX/mac}}&arch=${{buildarch}}"),
            ),
        ] {
            let pkt = request(MessageType::Discover, vci, arch, uc);
            let r = answer(&pkt, arrival(false), BASE, &c).unwrap();
            assert_eq!(r.client.kind, kind, "{vci} {arch:?}");
            assert_eq!(r.boot_file, want, "{vci} {arch:?}");
            assert_eq!(r.message, MessageType::Offer);
            let m = decoded(&r);
            assert_eq!(m.opcode(), Opcode::BootReply);
            assert_eq!(m.xid(), 0x1234_5678);
            assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED, "a proxy leases nothing");
            assert_eq!(m.siaddr(), SERVER);
            assert_eq!(m.chaddr(), &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
            assert!(m.flags().broadcast());
            assert_eq!(
                m.opts().get(OptionCode::ServerIdentifier),
                Some(&DhcpOption::ServerIdentifier(SERVER))
            );
            assert_eq!(
                m.opts().get(OptionCode::BootfileName),
                Some(&DhcpOption::BootfileName(want.clone().into_bytes()))
            );
            assert_eq!(m.fname_str().unwrap().unwrap().trim_end_matches('\0'), want);
            let class: &[u8] = if kind == ClientKind::Http {
                b"HTTPClient"
            } else {
                b"PXEClient"
            };
            assert_eq!(
                m.opts().get(OptionCode::ClassIdentifier),
                Some(&DhcpOption::ClassIdentifier(class.to_vec()))
            );
            assert!(m.opts().get(OptionCode::ClientMachineIdentifier).is_some());
            assert_eq!(
                m.opts().get(OptionCode::VendorExtensions).is_some(),
                kind == ClientKind::Pxe,
                "PXE discovery control only for firmware PXE"
            );
            assert!(r.bytes.len() >= MIN_REPLY);
        }
    }

    #[test]
    fn ignores_what_is_not_ours() {
        let c = config();
        let ignored = |pkt: &[u8], pxe_port| answer(pkt, arrival(pxe_port), BASE, &c).unwrap_err();
        // An ordinary DHCP client (the OS's udhcpc, say).
        assert_eq!(
            ignored(&request(MessageType::Discover, "", None, None), false),
            Ignored::NotPxe
        );
        assert_eq!(
            ignored(
                &request(MessageType::Discover, "udhcp 1.35.0", None, None),
                false
            ),
            Ignored::NotPxe
        );
        // A REQUEST to port 67 meant for the site's server.
        let mut m = Message::from_bytes(&request(
            MessageType::Request,
            "PXEClient:Arch:00000:UNDI:002001",
            Some(0),
            None,
        ))
        .unwrap();
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(ignored(&m.to_vec().unwrap(), false), Ignored::OtherServer);
        // The same without a server identifier, on 4011: ours.
        let req = request(
            MessageType::Request,
            "PXEClient:Arch:00007:UNDI:003000",
            Some(7),
            None,
        );
        let r = answer(&req, arrival(true), BASE, &c).unwrap();
        assert_eq!(r.message, MessageType::Ack);
        assert_eq!(ignored(&req, false), Ignored::OtherServer);
        // Releases, declines: not a proxy's business.
        assert_eq!(
            ignored(
                &request(
                    MessageType::Release,
                    "PXEClient:Arch:00000:UNDI:002001",
                    Some(0),
                    None
                ),
                false
            ),
            Ignored::MessageType(7)
        );
        // An architecture we have no file for.
        assert_eq!(
            ignored(
                &request(
                    MessageType::Discover,
                    "PXEClient:Arch:00002:UNDI:003000",
                    Some(2),
                    None
                ),
                false
            ),
            Ignored::Architecture(2)
        );
        // A server's reply is not a request.
        let mut m =
            Message::from_bytes(&request(MessageType::Discover, "PXEClient", Some(0), None))
                .unwrap();
        m.set_opcode(Opcode::BootReply);
        assert_eq!(ignored(&m.to_vec().unwrap(), false), Ignored::NotRequest);
    }

    #[test]
    fn malformed_packets_are_refused_not_panicked_on() {
        let c = config();
        let good = request(
            MessageType::Discover,
            "PXEClient:Arch:00000:UNDI:002001",
            Some(0),
            None,
        );
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            good[..100].to_vec(),
            good[..239].to_vec(),
            vec![0xff; 600],
        ];
        // Wrong magic cookie.
        let mut bad_magic = good.clone();
        bad_magic[236] = 0;
        cases.push(bad_magic);
        // An option whose length runs past the end.
        let mut overrun = good[..240].to_vec();
        overrun.extend_from_slice(&[53, 1, 1, 60, 200, b'P']);
        cases.push(overrun);
        // Hardware address length beyond chaddr.
        let mut hlen = good.clone();
        hlen[2] = 200;
        cases.push(hlen);
        // Every truncation of a good packet.
        cases.extend((0..good.len()).step_by(7).map(|n| good[..n].to_vec()));
        for pkt in cases {
            if let Ok(r) = answer(&pkt, arrival(false), BASE, &c) {
                // Only a prefix that still holds a whole request may be answered.
                assert!(pkt.len() >= 240, "answered {} bytes: {r:?}", pkt.len());
            }
        }
        assert!(matches!(
            answer(&[], arrival(false), BASE, &c),
            Err(Ignored::Malformed(_))
        ));
    }

    #[test]
    fn long_urls_go_in_the_option_only() {
        let mut c = config();
        c.boot_script = format!("/boot.ipxe?{}", "x".repeat(200));
        let pkt = request(
            MessageType::Discover,
            "PXEClient:Arch:00000:UNDI:002001",
            Some(0),
            Some(b"iPXE"),
        );
        let r = answer(&pkt, arrival(false), BASE, &c).unwrap();
        let m = decoded(&r);
        assert!(m.fname().is_none());
        assert_eq!(
            m.opts().get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(r.boot_file.into_bytes()))
        );
    }

    #[test]
    fn relayed_requests_name_the_relay() {
        let c = config();
        let mut m = Message::from_bytes(&request(
            MessageType::Discover,
            "PXEClient:Arch:00007:UNDI:003000",
            Some(7),
            None,
        ))
        .unwrap();
        m.set_giaddr(Ipv4Addr::new(10, 9, 0, 1));
        let r = answer(&m.to_vec().unwrap(), arrival(false), BASE, &c).unwrap();
        assert_eq!(r.relay, Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(decoded(&r).giaddr(), Ipv4Addr::new(10, 9, 0, 1));
    }
}
