//! Criterion: iPXE template parsing and rendering, the per-boot cost of a script.

use arges::ipxe::{ScriptKind, Template, Templates};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use std::hint::black_box;

fn context() -> serde_json::Value {
    json!({
        "action": "environment",
        "appliance": {"url": "http://10.0.0.1:8080"},
        "machine": {"uuid": "4c4c4544-0042-3510-8051-b4c04f595031", "mac": "52:54:00:12:34:56", "arch": "x86_64", "address": "10.0.0.7"},
        "server": {"id": "4c4c4544-0042-3510-8051-b4c04f595031", "accepted": true, "labels": {"rack": "r1"}},
        "env": {
            "name": "talos",
            "kernel_url": "http://10.0.0.1:8080/env/talos/vmlinuz",
            "kernel_name": "vmlinuz",
            "initrds": [{"name": "initramfs.xz", "url": "http://10.0.0.1:8080/env/talos/initramfs.xz"}],
            "cmdline": "talos.platform=metal console=tty0 talos.config=http://10.0.0.1:8080/configdata?uuid=x&token=y",
        },
        "boot_token": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "registration_token": "r",
        "local_disk": {"method": "exit"},
        "reason": "",
    })
}

fn bench(c: &mut Criterion) {
    let templates = Templates::builtin();
    let ctx = context();
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
