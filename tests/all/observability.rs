//! `deploy/observability/`: every alert rule and dashboard query names a metric the
//! appliance really exports, with label names it really uses (read from a live
//! `/metrics` after some boots). The rules' behaviour is `promtool test rules`, in the
//! Kubernetes suite (promtool is built from its Go module there).

use std::collections::{BTreeMap, BTreeSet};

use test_support::{Appliance, Registration, curl, random_file, repo};

/// Metric names of the exposition (`# TYPE` names) and, for every sample, its label names.
fn exported(text: &str) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let mut families = BTreeSet::new();
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                families.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let keys = labels.entry(name.to_string()).or_default();
            if let Some(body) = line[name_end..].strip_prefix('{') {
                for pair in body.split("\",") {
                    if let Some((k, _)) = pair.split_once("=\"") {
                        keys.insert(k.trim_start_matches(',').to_string());
                    }
                }
            }
        }
    }
    (families, labels)
}

/// Every PromQL expression the rules and the dashboard hold, with where it is.
fn expressions() -> Vec<(String, String)> {
    let dir = repo().join("deploy/observability");
    let rules: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("alerts.yaml")).expect("alerts.yaml"),
    )
    .expect("alerts.yaml is YAML");
    let mut out = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            out.push((
                format!("alert {}", rule["alert"].as_str().unwrap_or("?")),
                rule["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("dashboard.json")).expect("dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {}", panel["title"].as_str().unwrap_or("?")),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["definition"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

/// Each `arges_…` metric an expression names, with the label names of its selector.
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("arges_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut keys = Vec::new();
        if let Some(body) = tail[end..].strip_prefix('{') {
            let body = &body[..body.find('}').unwrap_or(body.len())];
            for m in body.split(',') {
                let k = m.split(['=', '!', '~']).next().unwrap_or("").trim();
                if !k.is_empty() {
                    keys.push(k.to_string());
                }
            }
        }
        out.push((name, keys));
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_alert_and_dashboard_query_names_what_the_appliance_exports() {
    // A plugin in the chain and proxyDHCP on: every edge has something to count.
    let dir = Appliance::prepare(&format!(
        "[dhcp]\nmode = \"proxy\"\nlisten = []\npxe_listen = [\"127.0.0.1:0\"]\n[plugins]\n{}",
        crate::plugins::cache_toml()
    ));
    crate::plugins::install(
        &dir.path().join("data/plugins"),
        "default-policy.wasm",
        &crate::plugins::shipped("default-policy.wasm"),
    );
    let a = Appliance::start_in(dir, &[]);
    a.wait_metric("arges_plugins_active 1");
    // Some boots: a proxyDHCP request, scripts, a TFTP read, kernel fetches, registrations.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    crate::dhcp::exchange(
        &sock,
        a.dhcp.expect("proxyDHCP"),
        &crate::dhcp::pxe_request_of([0x52, 0x54, 0, 0, 0, 1], 1, 7, None),
    );
    random_file(&a.tftp_root().join("ipxe.efi"), 10_000, 3);
    let _ = curl(&[&format!("tftp://{}/ipxe.efi", a.tftp)]);
    for i in 1..=3 {
        let r = Registration::numbered(i);
        let (_, script) = a.boot_script(r.uuid(), r.mac(), "127.0.0.1");
        if let Some(kernel) = script
            .lines()
            .find_map(|l| l.strip_prefix("kernel "))
            .and_then(|l| l.split_whitespace().next())
        {
            let _ = curl(&[kernel]);
        }
        a.register(&r);
    }
    let (families, labels) = exported(&a.metrics());
    let known = |name: &str| {
        ["", "_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    (suffix.is_empty() || !base.is_empty()) && families.contains(base)
                })
            })
    };
    let exprs = expressions();
    assert!(exprs.len() >= 25, "{} expressions", exprs.len());
    let mut named = 0;
    for (where_, expr) in &exprs {
        for (name, keys) in selectors(expr) {
            named += 1;
            assert!(known(&name), "{where_}: {name} is not exported:\n{expr}");
            // Label names are checked where the appliance has samples to show them.
            if let Some(have) = labels.get(&name).filter(|k| !k.is_empty()) {
                for k in keys
                    .iter()
                    .filter(|k| !["instance", "job", "le"].contains(&k.as_str()))
                {
                    assert!(
                        have.contains(k),
                        "{where_}: {name} has no label {k:?} (it has {have:?}):\n{expr}"
                    );
                }
            }
        }
    }
    assert!(named >= 30, "{named} metric references");
}

#[test]
fn a_misspelt_metric_or_label_is_caught() {
    let text =
        "# TYPE arges_boot_decisions counter\narges_boot_decisions_total{action=\"discover\"} 1\n";
    let (families, labels) = exported(text);
    assert!(families.contains("arges_boot_decisions"));
    assert_eq!(
        selectors(
            "sum by (action) (rate(arges_boot_decision_total{instance=~\"x\",acton=\"y\"}[5m]))"
        ),
        [(
            "arges_boot_decision_total".to_string(),
            vec!["instance".to_string(), "acton".to_string()]
        )]
    );
    let have = &labels["arges_boot_decisions_total"];
    assert!(have.contains("action") && !have.contains("acton"));
}
