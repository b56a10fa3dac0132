//! TFTP wire format: decoding requests and acknowledgements, encoding replies.
//!
//! The packets are tiny and flat (opcode, NUL-terminated strings, big-endian block
//! numbers), so they are parsed by hand over byte slices; a parser-combinator crate would
//! add nothing but indirection on the hottest path of the server.

use std::fmt;

/// Opcodes from RFC 1350 and RFC 2347.
pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Largest request we look at. RFC 2347 lets requests exceed 512 bytes, but nothing a
/// real client sends comes close to this; bigger ones are abuse.
pub const MAX_REQUEST_LEN: usize = 2048;
/// Most options a request may carry before it is refused as abuse.
pub const MAX_OPTIONS: usize = 16;

/// TFTP error codes (RFC 1350, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    IllegalOperation = 4,
    UnknownTid = 5,
    OptionRefused = 8,
}

/// Transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// A decoded read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub write: bool,
    pub filename: String,
    pub mode: Mode,
    /// Options as sent, names lower-cased, in order.
    pub options: Vec<(String, String)>,
}

/// Packets a client sends to a transfer port once the transfer has started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket {
    Ack(u16),
    Error { code: u16, message: String },
}

/// Why a packet could not be decoded; the text goes back to the client in an ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet too short")]
    Truncated,
    #[error("request larger than {MAX_REQUEST_LEN} bytes")]
    TooLarge,
    #[error("unexpected opcode {0}")]
    Opcode(u16),
    #[error("field is not NUL-terminated")]
    Unterminated,
    #[error("field is not valid UTF-8")]
    NotUtf8,
    #[error("unsupported transfer mode {0:?}")]
    Mode(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
}

impl DecodeError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::TooLarge => "too_large",
            DecodeError::Opcode(_) => "opcode",
            DecodeError::Unterminated => "unterminated",
            DecodeError::NotUtf8 => "not_utf8",
            DecodeError::Mode(_) => "mode",
            DecodeError::TooManyOptions => "too_many_options",
            DecodeError::OptionWithoutValue(_) => "option_without_value",
        }
    }
}

fn opcode(buf: &[u8]) -> Result<u16, DecodeError> {
    match buf {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(DecodeError::Truncated),
    }
}

/// Splits `buf` into NUL-terminated UTF-8 strings; the last one must be terminated too.
fn strings(buf: &[u8]) -> Result<Vec<&str>, DecodeError> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    if buf.last() != Some(&0) {
        return Err(DecodeError::Unterminated);
    }
    buf[..buf.len() - 1]
        .split(|b| *b == 0)
        .map(|s| std::str::from_utf8(s).map_err(|_| DecodeError::NotUtf8))
        .collect()
}

/// Decodes an RRQ or WRQ arriving on the well-known port.
pub fn decode_request(buf: &[u8]) -> Result<Request, DecodeError> {
    if buf.len() > MAX_REQUEST_LEN {
        return Err(DecodeError::TooLarge);
    }
    let write = match opcode(buf)? {
        OP_RRQ => false,
        OP_WRQ => true,
        other => return Err(DecodeError::Opcode(other)),
    };
    let fields = strings(&buf[2..])?;
    let (filename, mode, rest) = match fields.as_slice() {
        [filename, mode, rest @ ..] => (*filename, *mode, rest),
        _ => return Err(DecodeError::Truncated),
    };
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        _ => return Err(DecodeError::Mode(mode.to_string())),
    };
    // Some clients pad requests with a trailing NUL; an empty trailing name is not an option.
    let rest: &[&str] = match rest {
        [head @ .., ""] if rest.len() % 2 == 1 => head,
        _ => rest,
    };
    if rest.len() / 2 > MAX_OPTIONS {
        return Err(DecodeError::TooManyOptions);
    }
    let mut options = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        match pair {
            [name, value] => options.push((name.to_ascii_lowercase(), value.to_string())),
            [name] => return Err(DecodeError::OptionWithoutValue(name.to_string())),
            _ => unreachable!("chunks(2) yields one or two items"),
        }
    }
    Ok(Request {
        write,
        filename: filename.to_string(),
        mode,
        options,
    })
}

/// Decodes what a client sends to a transfer port.
pub fn decode_client(buf: &[u8]) -> Result<ClientPacket, DecodeError> {
    match opcode(buf)? {
        OP_ACK => match buf {
            [_, _, a, b] => Ok(ClientPacket::Ack(u16::from_be_bytes([*a, *b]))),
            // Trailing bytes after an ACK are tolerated: some stacks pad small datagrams.
            [_, _, a, b, ..] => Ok(ClientPacket::Ack(u16::from_be_bytes([*a, *b]))),
            _ => Err(DecodeError::Truncated),
        },
        OP_ERROR => {
            if buf.len() < 4 {
                return Err(DecodeError::Truncated);
            }
            let code = u16::from_be_bytes([buf[2], buf[3]]);
            let text = buf[4..].split(|b| *b == 0).next().unwrap_or_default();
            Ok(ClientPacket::Error {
                code,
                message: String::from_utf8_lossy(text).into_owned(),
            })
        }
        other => Err(DecodeError::Opcode(other)),
    }
}

/// Encodes an ERROR packet.
pub fn encode_error(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.push(0);
    out
}

/// Encodes an OACK with the accepted options, in the order given.
pub fn encode_oack(options: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&OP_OACK.to_be_bytes());
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// Encodes an ACK (used by tests and the load generator acting as a client).
pub fn encode_ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, OP_ACK as u8, b[0], b[1]]
}

/// Encodes a read request (used by tests, benches and the load generator).
pub fn encode_rrq(filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + filename.len());
    out.extend_from_slice(&OP_RRQ.to_be_bytes());
    for s in [filename, mode]
        .into_iter()
        .chain(options.iter().flat_map(|(n, v)| [*n, *v]))
    {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    out
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_request_with_options() {
        let raw = encode_rrq("ipxe.efi", "OCTET", &[("BLKSIZE", "1468"), ("tsize", "0")]);
        let req = decode_request(&raw).unwrap();
        assert_eq!(req.filename, "ipxe.efi");
        assert_eq!(req.mode, Mode::Octet);
        assert!(!req.write);
        assert_eq!(
            req.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
    }

    #[test]
    fn rejects_malformed_requests() {
        assert_eq!(decode_request(&[0]), Err(DecodeError::Truncated));
        assert_eq!(
            decode_request(&[0, 1, b'a']),
            Err(DecodeError::Unterminated)
        );
        assert_eq!(
            decode_request(&[0, 1, b'a', 0]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_request(&[0, 9, b'a', 0, b'b', 0]),
            Err(DecodeError::Opcode(9))
        );
        assert!(matches!(
            decode_request(&encode_rrq("a", "mail", &[])),
            Err(DecodeError::Mode(_))
        ));
        assert_eq!(
            decode_request(&[0, 1, 0xff, 0, b'o', 0]),
            Err(DecodeError::NotUtf8)
        );
        let mut odd = encode_rrq("a", "octet", &[("blksize", "512")]);
        odd.extend_from_slice(b"tsize\0x\0windowsize\0");
        assert!(matches!(
            decode_request(&odd),
            Err(DecodeError::OptionWithoutValue(_))
        ));
        let many: Vec<(String, String)> = (0..20).map(|i| (format!("o{i}"), "1".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            decode_request(&encode_rrq("a", "octet", &many)),
            Err(DecodeError::TooManyOptions)
        );
        assert_eq!(
            decode_request(&vec![0u8; MAX_REQUEST_LEN + 1]),
            Err(DecodeError::TooLarge)
        );
    }

    #[test]
    fn tolerates_trailing_padding() {
        let mut raw = encode_rrq("f", "octet", &[("tsize", "0")]);
        raw.push(0);
        assert_eq!(decode_request(&raw).unwrap().options.len(), 1);
    }

    #[test]
    fn decodes_client_packets() {
        assert_eq!(
            decode_client(&encode_ack(65535)),
            Ok(ClientPacket::Ack(65535))
        );
        assert_eq!(decode_client(&[0, 4, 1]), Err(DecodeError::Truncated));
        let err = encode_error(ErrorCode::OptionRefused, "tsize probe");
        assert_eq!(
            decode_client(&err),
            Ok(ClientPacket::Error {
                code: 8,
                message: "tsize probe".into()
            })
        );
    }
}
