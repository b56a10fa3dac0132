//! The facts file of `arges plugin decide` and of each case of `arges plugin test`: a
//! machine as a plugin sees it, written by hand. Every field may be left out (a missing
//! one takes the value an unregistered machine has), names may be written as the WIT
//! writes them (`client-address`) or with underscores, and labels may be a map or the
//! WIT's list of pairs. Unknown fields are refused by name, so a typo is not silently a
//! default.

use std::collections::BTreeMap;
use std::net::IpAddr;

use arges::core::{HardwareSummary, InventoryFacts, MachineFacts};
use serde::Deserialize;

/// The address a facts file without `client-address` asks from (TEST-NET-1).
pub const DEFAULT_CLIENT_ADDRESS: &str = "192.0.2.10";

/// A machine's facts as a person writes them.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FactsFile {
    uuid: Option<String>,
    mac: Option<String>,
    arch: Option<String>,
    #[serde(alias = "client_address")]
    client_address: Option<IpAddr>,
    inventory: InventoryFile,
    hardware: HardwareFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct InventoryFile {
    registered: bool,
    #[serde(alias = "server_id")]
    server_id: Option<String>,
    accepted: bool,
    cordoned: bool,
    environment: Option<String>,
    labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct HardwareFile {
    vendor: String,
    product: String,
    cpus: u32,
    #[serde(alias = "memory_bytes")]
    memory_bytes: u64,
    disks: u32,
    nics: u32,
}

/// Labels as a map (`{rack: r1}`) or as the WIT's list of pairs (`[[rack, r1]]`).
#[derive(Debug, Default)]
struct Labels(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Map(BTreeMap<String, String>),
            Pairs(Vec<(String, String)>),
        }
        match Shape::deserialize(d) {
            Ok(Shape::Map(m)) => Ok(Labels(m)),
            Ok(Shape::Pairs(p)) => Ok(Labels(p.into_iter().collect())),
            Err(_) => Err(serde::de::Error::custom(
                "labels are a map of strings ({\"rack\": \"r1\"}) or a list of pairs ([[\"rack\", \"r1\"]])",
            )),
        }
    }
}

impl FactsFile {
    /// The facts the host hands the plugin.
    pub fn into_facts(self) -> MachineFacts {
        let inv = self.inventory;
        let hw = self.hardware;
        MachineFacts {
            uuid: self.uuid.map(|u| u.to_ascii_lowercase()),
            mac: self.mac.map(|m| m.to_ascii_lowercase().replace('-', ":")),
            arch: self.arch,
            client_address: self
                .client_address
                .unwrap_or_else(|| DEFAULT_CLIENT_ADDRESS.parse().expect("a valid address")),
            inventory: InventoryFacts {
                registered: inv.registered,
                server_id: inv.server_id,
                accepted: inv.accepted,
                cordoned: inv.cordoned,
                environment: inv.environment,
                labels: inv.labels.0,
            },
            hardware: HardwareSummary {
                vendor: hw.vendor,
                product: hw.product,
                cpus: hw.cpus,
                memory_bytes: hw.memory_bytes,
                disks: hw.disks,
                nics: hw.nics,
            },
        }
    }
}

/// Reads a structured document (JSON, YAML or TOML, by `path`'s extension; JSON and
/// YAML also without one) into `T`, naming the field that is wrong in plain words.
pub fn read_document<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    parse_document(&text, path)
}

/// [`read_document`] on text already read; `path` names it and picks the format.
pub fn parse_document<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> anyhow::Result<T> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let value: serde_json::Value = match ext {
        "toml" => toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        // YAML is a superset of JSON: one parser for both.
        _ => {
            serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        let what = plain(&e.into_inner().to_string());
        if at == "." {
            anyhow::anyhow!("{}: {what}", path.display())
        } else {
            anyhow::anyhow!("{}: {at}: {what}", path.display())
        }
    })
}

/// serde's messages, in the words a person writing the file uses.
fn plain(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return match rest.split_once(", expected one of ") {
            Some((field, known)) => format!("no such field {field} (the fields here are {known})"),
            None => format!("no such field {rest}"),
        };
    }
    message
        .replace("invalid type: ", "")
        .replace("integer", "a number")
        .replace("u32", "a whole number")
        .replace("u64", "a whole number")
        .replace(", expected", ", where the field takes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(text: &str, ext: &str) -> anyhow::Result<MachineFacts> {
        parse_document::<FactsFile>(text, std::path::Path::new(&format!("facts.{ext}")))
            .map(FactsFile::into_facts)
    }

    #[test]
    fn an_empty_file_is_an_unregistered_machine() {
        let f = facts("{}", "json").unwrap();
        assert!(!f.inventory.registered && f.inventory.labels.is_empty());
        assert_eq!(f.hardware.disks, 0);
        assert_eq!(f.client_address.to_string(), DEFAULT_CLIENT_ADDRESS);
    }

    #[test]
    fn labels_come_as_a_map_or_as_pairs_and_names_with_dashes_or_underscores() {
        let a = facts(
            r#"{"client-address": "10.0.0.7", "inventory": {"labels": {"rack": "r1"}}, "hardware": {"memory-bytes": 5}}"#,
            "json",
        )
        .unwrap();
        let b = facts(
            "client_address: 10.0.0.7\ninventory:\n  labels: [[rack, r1]]\nhardware:\n  memory_bytes: 5\n",
            "yaml",
        )
        .unwrap();
        let c = facts(
            "client-address = \"10.0.0.7\"\n[inventory]\nlabels = { rack = \"r1\" }\n[hardware]\nmemory-bytes = 5\n",
            "toml",
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            a.inventory.labels.get("rack").map(String::as_str),
            Some("r1")
        );
    }

    #[test]
    fn errors_name_the_field_in_plain_words() {
        for (text, says) in [
            (
                r#"{"hardware": {"disks": "two"}}"#,
                &["hardware.disks", "where the field takes a whole number"][..],
            ),
            (
                r#"{"hardware": {"memory": 1}}"#,
                &[
                    "no such field `memory` (the fields here are",
                    "memory-bytes",
                ],
            ),
            (
                r#"{"inventory": {"labels": 3}}"#,
                &["inventory.labels", "list of pairs"],
            ),
            (r#"{"client-address": "here"}"#, &["client-address"]),
        ] {
            let e = facts(text, "json").unwrap_err().to_string();
            for s in says {
                assert!(e.contains(s), "{s:?} not in {e:?}");
            }
        }
    }
}
