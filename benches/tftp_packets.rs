//! Criterion: TFTP packet decoding and option negotiation (per-request costs).

use arges::tftp::packet::{decode_client, decode_request, encode_ack, encode_rrq};
use arges::tftp::{TftpSettings, transfer::negotiate};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let rrq = encode_rrq(
        "ipxe/snponly.efi",
        "octet",
        &[("blksize", "1468"), ("tsize", "0"), ("windowsize", "16")],
    );
    c.bench_function("decode RRQ with options", |b| {
        b.iter(|| decode_request(black_box(&rrq)).unwrap())
    });
    let req = decode_request(&rrq).unwrap();
    let settings = TftpSettings::default();
    c.bench_function("negotiate options", |b| {
        b.iter(|| negotiate(black_box(&req), 1 << 20, &settings))
    });
    let ack = encode_ack(4242);
    c.bench_function("decode ACK", |b| {
        b.iter(|| decode_client(black_box(&ack)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
