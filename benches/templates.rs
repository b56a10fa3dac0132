//! Criterion: iPXE template parsing and rendering, the per-boot cost of a script.

use arges::ipxe::{ScriptKind, Template, Templates, example_context};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let templates = Templates::builtin();
    let ctx = example_context("environment");
    c.bench_function("render environment script", |b| {
        b.iter(|| {
            templates
                .get(ScriptKind::Environment)
                .render(black_box(&ctx))
                .unwrap()
        })
    });
    c.bench_function("render local-disk script", |b| {
        b.iter(|| {
            templates
                .get(ScriptKind::LocalDisk)
                .render(black_box(&ctx))
                .unwrap()
        })
    });
    let cmdline = Template::parse(
        "cmdline",
        "talos.platform=metal console=tty0 talos.config={{ appliance.url }}/configdata?uuid={{ machine.uuid }}&token={{ boot_token }}",
    )
    .unwrap();
    c.bench_function("render kernel command line", |b| {
        b.iter(|| cmdline.render(black_box(&ctx)).unwrap())
    });
    let src = include_str!("../appliance/src/ipxe/builtin/environment.ipxe");
    c.bench_function("parse environment template", |b| {
        b.iter(|| Template::parse("environment", black_box(src)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
