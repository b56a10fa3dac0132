//! Criterion: TFTP packet decode, option negotiation and DATA encoding (per-packet costs).

use arges::tftp::packet::{decode_client, decode_request, encode_ack, encode_data, encode_rrq};
use arges::tftp::{TftpSettings, transfer::negotiate};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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
    let block = vec![0x5au8; 1468];
    let mut out = Vec::with_capacity(1472);
    let mut g = c.benchmark_group("encode DATA");
    g.throughput(Throughput::Bytes(1468));
    g.bench_function("1468-byte block", |b| {
        b.iter(|| encode_data(&mut out, black_box(7), black_box(&block)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
