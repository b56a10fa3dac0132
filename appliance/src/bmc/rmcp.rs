//! IPMI 2.0 RMCP+ on the wire: packet framing, the RAKP key exchange and per-packet
//! integrity and confidentiality (IPMI 2.0 §13). Pure functions over bytes, so every
//! step is testable without a BMC; [`super::ipmi`] drives them over UDP.
//!
//! Written here rather than taken from `ipmi-rs` (which the agent keeps using for the
//! local `/dev/ipmi0`): its RMCP+ is blocking, knows cipher suite 3 only, never resends a
//! lost packet and never closes its session, and all four matter against real BMCs.
//! Suites: 3 (HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128) and 17 (HMAC-SHA256,
//! HMAC-SHA256-128, AES-CBC-128). CBC is a dozen lines over the `aes` block cipher because
//! IPMI pads with its own scheme (1, 2, 3, … then the count), not PKCS#7.

use aes::Aes128;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use hmac::{Hmac, Mac};

/// RMCP header of every IPMI packet: version 6, no RMCP ack, class IPMI.
const RMCP_HEADER: [u8; 4] = [0x06, 0x00, 0xFF, 0x07];
/// Authentication type "RMCP+" in the session header.
const AUTH_RMCP_PLUS: u8 = 0x06;
const PAYLOAD_ENCRYPTED: u8 = 0x80;
const PAYLOAD_AUTHENTICATED: u8 = 0x40;

/// RMCP+ payload types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Payload {
    Ipmi = 0x00,
    OpenSessionRequest = 0x10,
    OpenSessionResponse = 0x11,
    Rakp1 = 0x12,
    Rakp2 = 0x13,
    Rakp3 = 0x14,
    Rakp4 = 0x15,
}

impl Payload {
    fn from_u8(b: u8) -> Option<Payload> {
        Some(match b & 0x3F {
            0x00 => Payload::Ipmi,
            0x10 => Payload::OpenSessionRequest,
            0x11 => Payload::OpenSessionResponse,
            0x12 => Payload::Rakp1,
            0x13 => Payload::Rakp2,
            0x14 => Payload::Rakp3,
            0x15 => Payload::Rakp4,
            _ => return None,
        })
    }
}

/// A cipher suite we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// HMAC-SHA1 / HMAC-SHA1-96 / AES-CBC-128: what nearly every BMC offers.
    Three,
    /// HMAC-SHA256 / HMAC-SHA256-128 / AES-CBC-128: newer BMCs, and the one to prefer.
    Seventeen,
}

impl Suite {
    /// The suite's number.
    pub fn id(self) -> u8 {
        match self {
            Suite::Three => 3,
            Suite::Seventeen => 17,
        }
    }
    /// Authentication, integrity and confidentiality algorithm numbers.
    fn algorithms(self) -> (u8, u8, u8) {
        match self {
            Suite::Three => (0x01, 0x01, 0x01),
            Suite::Seventeen => (0x03, 0x04, 0x01),
        }
    }
    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC takes keys of any length.
            let mut m = <M as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Suite::Three => run::<Hmac<sha1::Sha1>>(key, parts),
            Suite::Seventeen => run::<Hmac<sha2::Sha256>>(key, parts),
        }
    }
    /// Length of the integrity AuthCode on each packet.
    fn auth_code_len(self) -> usize {
        match self {
            Suite::Three => 12,
            Suite::Seventeen => 16,
        }
    }
    /// Length of RAKP 4's integrity check value.
    fn rakp4_len(self) -> usize {
        self.auth_code_len()
    }
}

/// Why a packet or exchange was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet too short ({0} bytes)")]
    Short(usize),
    #[error("not an RMCP+ IPMI packet")]
    NotRmcpPlus,
    #[error("unexpected payload type {0:#04x}")]
    PayloadType(u8),
    #[error("packet integrity check failed")]
    Integrity,
    #[error("cannot decrypt the payload")]
    Decrypt,
    #[error("IPMI message checksum mismatch")]
    Checksum,
}

/// Session keys after RAKP.
#[derive(Clone)]
pub struct Keys {
    pub suite: Suite,
    /// Integrity key.
    pub k1: Vec<u8>,
    /// Confidentiality key (AES-128 uses its first 16 bytes).
    pub k2: Vec<u8>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys never reach a log.
        f.debug_struct("Keys")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// What both sides know once RAKP 1 and 2 have passed.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub suite: Suite,
    /// Our session id (SIDm).
    pub console_id: u32,
    /// The BMC's session id (SIDc).
    pub bmc_id: u32,
    pub console_random: [u8; 16],
    pub bmc_random: [u8; 16],
    pub bmc_guid: [u8; 16],
    /// Requested role byte, as sent in RAKP 1 (privilege | name-only lookup).
    pub role: u8,
    pub user: Vec<u8>,
}

impl Handshake {
    /// Checks RAKP 2's key exchange auth code: proves the BMC knows the password.
    pub fn bmc_proof_ok(&self, password: &[u8], code: &[u8]) -> bool {
        let want = self.suite.hmac(
            password,
            &[
                &self.console_id.to_le_bytes(),
                &self.bmc_id.to_le_bytes(),
                &self.console_random,
                &self.bmc_random,
                &self.bmc_guid,
                &[self.role, self.user.len() as u8],
                &self.user,
            ],
        );
        constant_time_eq(&want, code)
    }

    /// RAKP 3's auth code: proves we know the password.
    pub fn console_proof(&self, password: &[u8]) -> Vec<u8> {
        self.suite.hmac(
            password,
            &[
                &self.bmc_random,
                &self.console_id.to_le_bytes(),
                &[self.role, self.user.len() as u8],
                &self.user,
            ],
        )
    }

    /// The session integrity key SIK, and K1/K2 from it (no BMC key: KG is the password).
    pub fn keys(&self, password: &[u8]) -> (Vec<u8>, Keys) {
        let sik = self.suite.hmac(
            password,
            &[
                &self.console_random,
                &self.bmc_random,
                &[self.role, self.user.len() as u8],
                &self.user,
            ],
        );
        let k1 = self.suite.hmac(&sik, &[&[0x01; 20]]);
        let k2 = self.suite.hmac(&sik, &[&[0x02; 20]]);
        (
            sik,
            Keys {
                suite: self.suite,
                k1,
                k2,
            },
        )
    }

    /// Checks RAKP 4's integrity check value.
    pub fn rakp4_ok(&self, sik: &[u8], icv: &[u8]) -> bool {
        let want = self.suite.hmac(
            sik,
            &[
                &self.console_random,
                &self.bmc_id.to_le_bytes(),
                &self.bmc_guid,
            ],
        );
        icv.len() == self.suite.rakp4_len()
            && constant_time_eq(&want[..self.suite.rakp4_len()], icv)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The Open Session Request payload.
pub fn open_session_request(tag: u8, console_id: u32, suite: Suite) -> Vec<u8> {
    let (auth, integrity, conf) = suite.algorithms();
    let mut p = vec![tag, 0x04, 0, 0];
    p.extend_from_slice(&console_id.to_le_bytes());
    for (kind, alg) in [(0u8, auth), (1, integrity), (2, conf)] {
        p.extend_from_slice(&[kind, 0, 0, 8, alg, 0, 0, 0]);
    }
    p
}

/// The RAKP 1 payload.
pub fn rakp1(tag: u8, h: &Handshake) -> Vec<u8> {
    let mut p = vec![tag, 0, 0, 0];
    p.extend_from_slice(&h.bmc_id.to_le_bytes());
    p.extend_from_slice(&h.console_random);
    p.extend_from_slice(&[h.role, 0, 0, h.user.len() as u8]);
    p.extend_from_slice(&h.user);
    p
}

/// The RAKP 3 payload.
pub fn rakp3(tag: u8, h: &Handshake, password: &[u8]) -> Vec<u8> {
    let mut p = vec![tag, 0, 0, 0];
    p.extend_from_slice(&h.bmc_id.to_le_bytes());
    p.extend_from_slice(&h.console_proof(password));
    p
}

/// Frames a payload. With `keys`, the payload is encrypted and the packet carries an
/// integrity AuthCode; `session_id` and `seq` are zero before the session is active.
pub fn frame(
    payload_type: Payload,
    session_id: u32,
    seq: u32,
    payload: &[u8],
    keys: Option<&Keys>,
) -> Vec<u8> {
    let mut out = RMCP_HEADER.to_vec();
    let body = match keys {
        Some(k) => encrypt(&k.k2[..16], payload),
        None => payload.to_vec(),
    };
    let flags = if keys.is_some() {
        PAYLOAD_ENCRYPTED | PAYLOAD_AUTHENTICATED
    } else {
        0
    };
    out.push(AUTH_RMCP_PLUS);
    out.push(flags | payload_type as u8);
    out.extend_from_slice(&session_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&body);
    if let Some(k) = keys {
        // Pad so that the authenticated part (auth type .. next header) is a multiple of 4.
        let covered = out.len() - RMCP_HEADER.len() + 2;
        let pad = (4 - covered % 4) % 4;
        out.extend(std::iter::repeat_n(0xFF, pad));
        out.push(pad as u8);
        out.push(0x07);
        let code = k.suite.hmac(&k.k1, &[&out[RMCP_HEADER.len()..]]);
        out.extend_from_slice(&code[..k.suite.auth_code_len()]);
    }
    out
}

/// A received packet, checked and decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub payload_type: Payload,
    pub session_id: u32,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// Parses a packet; with `keys`, authenticated packets must verify and are decrypted.
pub fn unframe(packet: &[u8], keys: Option<&Keys>) -> Result<Received, WireError> {
    if packet.len() < 16 {
        return Err(WireError::Short(packet.len()));
    }
    if packet[..4] != RMCP_HEADER || packet[4] != AUTH_RMCP_PLUS {
        return Err(WireError::NotRmcpPlus);
    }
    let kind = packet[5];
    let payload_type = Payload::from_u8(kind).ok_or(WireError::PayloadType(kind))?;
    let session_id = u32::from_le_bytes([packet[6], packet[7], packet[8], packet[9]]);
    let seq = u32::from_le_bytes([packet[10], packet[11], packet[12], packet[13]]);
    let len = usize::from(u16::from_le_bytes([packet[14], packet[15]]));
    let end = 16 + len;
    if packet.len() < end {
        return Err(WireError::Short(packet.len()));
    }
    let mut payload = packet[16..end].to_vec();
    if kind & PAYLOAD_AUTHENTICATED != 0 {
        let k = keys.ok_or(WireError::Integrity)?;
        let code_len = k.suite.auth_code_len();
        if packet.len() < end + 2 + code_len {
            return Err(WireError::Short(packet.len()));
        }
        let (covered, code) = packet.split_at(packet.len() - code_len);
        let want = k.suite.hmac(&k.k1, &[&covered[RMCP_HEADER.len()..]]);
        if !constant_time_eq(&want[..code_len], code) {
            return Err(WireError::Integrity);
        }
    } else if keys.is_some() && payload_type == Payload::Ipmi {
        // An active session never accepts an unauthenticated IPMI message.
        return Err(WireError::Integrity);
    }
    if kind & PAYLOAD_ENCRYPTED != 0 {
        let k = keys.ok_or(WireError::Decrypt)?;
        payload = decrypt(&k.k2[..16], &payload).ok_or(WireError::Decrypt)?;
    }
    Ok(Received {
        payload_type,
        session_id,
        seq,
        payload,
    })
}

fn cipher(key: &[u8]) -> Aes128 {
    // Callers pass the first 16 bytes of K2.
    Aes128::new_from_slice(key).expect("AES-128 takes a 16-byte key")
}

/// AES-CBC-128 with IPMI's padding; a random IV leads the output.
fn encrypt(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut iv = [0u8; 16];
    // The OS RNG failing is unrecoverable for anything security-related.
    getrandom::fill(&mut iv).expect("the operating system's random number generator failed");
    encrypt_with_iv(key, iv, data)
}

fn encrypt_with_iv(key: &[u8], iv: [u8; 16], data: &[u8]) -> Vec<u8> {
    let aes = cipher(key);
    let mut plain = data.to_vec();
    let pad = (16 - (data.len() + 1) % 16) % 16;
    plain.extend((1..=pad).map(|i| i as u8));
    plain.push(pad as u8);
    let mut out = iv.to_vec();
    let mut prev = iv;
    for chunk in plain.chunks(16) {
        let mut block = aes::Block::default();
        for (i, b) in block.iter_mut().enumerate() {
            *b = chunk[i] ^ prev[i];
        }
        aes.encrypt_block(&mut block);
        prev.copy_from_slice(&block);
        out.extend_from_slice(&block);
    }
    out
}

fn decrypt(key: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 32 || !data.len().is_multiple_of(16) {
        return None;
    }
    let aes = cipher(key);
    let (iv, body) = data.split_at(16);
    let mut prev: [u8; 16] = iv.try_into().ok()?;
    let mut out = Vec::with_capacity(body.len());
    for chunk in body.chunks(16) {
        let mut block = aes::Block::default();
        block.copy_from_slice(chunk);
        aes.decrypt_block(&mut block);
        for (i, b) in block.iter().enumerate() {
            out.push(b ^ prev[i]);
        }
        prev.copy_from_slice(chunk);
    }
    let pad = usize::from(*out.last()?);
    if pad >= 16 || out.len() < pad + 1 {
        return None;
    }
    out.truncate(out.len() - pad - 1);
    Some(out)
}

/// Requester address of a remote console (software id 0x40, bit 0 set: software).
pub const CONSOLE_ADDR: u8 = 0x81;
/// The BMC's responder address.
pub const BMC_ADDR: u8 = 0x20;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// An IPMI request message (the payload of type [`Payload::Ipmi`]).
pub fn ipmi_request(netfn: u8, cmd: u8, rq_seq: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![BMC_ADDR, netfn << 2];
    m.push(checksum(&m));
    let start = m.len();
    m.extend_from_slice(&[CONSOLE_ADDR, (rq_seq & 0x3F) << 2, cmd]);
    m.extend_from_slice(data);
    let c = checksum(&m[start..]);
    m.push(c);
    m
}

/// An IPMI response: `(netfn, rq_seq, cmd, completion code, data)`.
pub fn ipmi_response(m: &[u8]) -> Result<(u8, u8, u8, u8, Vec<u8>), WireError> {
    if m.len() < 8 {
        return Err(WireError::Short(m.len()));
    }
    if checksum(&m[..2]) != m[2] || checksum(&m[3..m.len() - 1]) != m[m.len() - 1] {
        return Err(WireError::Checksum);
    }
    Ok((m[1] >> 2, m[4] >> 2, m[5], m[6], m[7..m.len() - 1].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(suite: Suite) -> Keys {
        Keys {
            suite,
            k1: vec![7; if suite == Suite::Three { 20 } else { 32 }],
            k2: vec![9; 20],
        }
    }

    #[test]
    fn cbc_with_ipmi_padding_round_trips() {
        let key = [3u8; 16];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let enc = encrypt(&key, &data);
            assert_eq!(enc.len() % 16, 0);
            assert_eq!(decrypt(&key, &enc).unwrap(), data, "len {len}");
        }
        // The padding is 1, 2, 3, … then its length.
        let enc = encrypt_with_iv(&key, [0; 16], b"abc");
        let aes = cipher(&key);
        let mut block = aes::Block::default();
        block.copy_from_slice(&enc[16..32]);
        aes.decrypt_block(&mut block);
        assert_eq!(&block[..4], b"abc\x01");
        assert_eq!(block[15], 12);
        assert!(decrypt(&key, &enc[..20]).is_none());
    }

    #[test]
    fn framed_packets_verify_and_tampering_is_caught() {
        for suite in [Suite::Three, Suite::Seventeen] {
            let k = keys(suite);
            let msg = ipmi_request(0x00, 0x01, 5, &[]);
            let pkt = frame(Payload::Ipmi, 0x1234, 9, &msg, Some(&k));
            // Authenticated part is a multiple of four.
            let covered = pkt.len() - 4 - suite.auth_code_len();
            assert_eq!(covered % 4, 0);
            let r = unframe(&pkt, Some(&k)).unwrap();
            assert_eq!((r.session_id, r.seq), (0x1234, 9));
            assert_eq!(r.payload, msg);
            let mut bad = pkt.clone();
            bad[20] ^= 1;
            assert_eq!(unframe(&bad, Some(&k)), Err(WireError::Integrity));
            let mut other = k.clone();
            other.k1[0] ^= 1;
            assert_eq!(unframe(&pkt, Some(&other)), Err(WireError::Integrity));
            // Unauthenticated IPMI inside a session is refused.
            let plain = frame(Payload::Ipmi, 0x1234, 9, &msg, None);
            assert_eq!(unframe(&plain, Some(&k)), Err(WireError::Integrity));
        }
        for short in [&[][..], &[6, 0, 0xff, 7][..], &[0u8; 15][..]] {
            assert!(unframe(short, None).is_err());
        }
    }

    #[test]
    fn rakp_proofs_agree_between_the_two_sides() {
        for suite in [Suite::Three, Suite::Seventeen] {
            let h = Handshake {
                suite,
                console_id: 0xA1A2A3A4,
                bmc_id: 0x01020304,
                console_random: [1; 16],
                bmc_random: [2; 16],
                bmc_guid: [3; 16],
                role: 0x14,
                user: b"admin".to_vec(),
            };
            // What a BMC with the same password would send in RAKP 2.
            let rakp2 = suite.hmac(
                b"password",
                &[
                    &h.console_id.to_le_bytes(),
                    &h.bmc_id.to_le_bytes(),
                    &h.console_random,
                    &h.bmc_random,
                    &h.bmc_guid,
                    &[h.role, 5],
                    b"admin",
                ],
            );
            assert!(h.bmc_proof_ok(b"password", &rakp2));
            assert!(!h.bmc_proof_ok(b"wrong", &rakp2), "wrong password is seen");
            let (sik, k) = h.keys(b"password");
            assert_eq!(sik.len(), if suite == Suite::Three { 20 } else { 32 });
            assert_ne!(k.k1, k.k2);
            let icv = suite.hmac(
                &sik,
                &[&h.console_random, &h.bmc_id.to_le_bytes(), &h.bmc_guid],
            );
            assert!(h.rakp4_ok(&sik, &icv[..suite.rakp4_len()]));
            assert!(!h.rakp4_ok(&sik, &icv[..4]));
        }
    }

    #[test]
    fn ipmi_messages_carry_checksums() {
        let m = ipmi_request(0x06, 0x3B, 3, &[0x04]);
        assert_eq!(m[..3], [0x20, 0x18, 0xC8]);
        assert_eq!(m.iter().skip(3).fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // A response to it.
        let mut r = vec![0x81, (0x07 << 2), 0];
        r[2] = checksum(&r[..2]);
        let mut body = vec![0x20, 3 << 2, 0x3B, 0x00, 0x04];
        let c = checksum(&body);
        body.push(c);
        r.extend(body);
        assert_eq!(ipmi_response(&r).unwrap(), (0x07, 3, 0x3B, 0, vec![0x04]));
        r[4] ^= 1;
        assert_eq!(ipmi_response(&r), Err(WireError::Checksum));
    }
}
