//! The cases file of `arges plugin test`: a plugin's own config table and a table of
//! machines with the decision each must get, in YAML, JSON or TOML:
//!
//! ```yaml
//! config:                      # as [plugins.config.<name>] in appliance.toml
//!   environment: talos
//! cases:
//!   - name: a quarantined machine is refused
//!     facts: { inventory: { labels: { quarantine: "true" } } }
//!     expect: deny             # an action: pass, discover, environment, local-disk,
//!                              # wipe, script, deny; or error (the plugin fails)
//!   - name: an accepted machine installs talos
//!     facts: { inventory: { registered: true, accepted: true } }
//!     expect: environment talos           # an action and its exact value
//!   - facts: { mac: "52:54:00:00:00:01" }
//!     expect: { action: deny, contains: "deny list" }   # or a part of the value
//! ```

use arges::core::BootAction;
use serde::Deserialize;

use super::facts::FactsFile;

/// A cases file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    /// The plugin's config table.
    #[serde(default)]
    pub config: toml::Table,
    pub cases: Vec<CaseFile>,
}

/// One case as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub facts: FactsFile,
    pub expect: ExpectFile,
}

/// `expect`: `deny`, `environment talos`, or `{action, value, contains}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ExpectFile {
    Words(String),
    Table(ExpectTable),
}

/// `expect` as a table; a misspelt key is refused, never ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectTable {
    action: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    contains: Option<String>,
}

/// The actions a case may expect, as the WIT names them.
const ACTIONS: [&str; 8] = [
    "pass",
    "discover",
    "environment",
    "local-disk",
    "wipe",
    "script",
    "deny",
    "error",
];

/// What one case expects, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    pub action: String,
    pub value: Option<String>,
    pub contains: Option<String>,
}

impl ExpectFile {
    /// Checks the action's name; the error says which names there are.
    pub fn check(self) -> Result<Expect, String> {
        let (action, value, contains) = match self {
            ExpectFile::Words(w) => match w.trim().split_once(char::is_whitespace) {
                Some((a, v)) => (a.to_string(), Some(v.trim().to_string()), None),
                None => (w.trim().to_string(), None, None),
            },
            ExpectFile::Table(ExpectTable {
                action,
                value,
                contains,
            }) => (action, value, contains),
        };
        let action = action.replace('_', "-");
        if !ACTIONS.contains(&action.as_str()) {
            return Err(format!(
                "expect: {action:?} is not an action (the actions are {})",
                ACTIONS.join(", ")
            ));
        }
        let valueless = !matches!(action.as_str(), "environment" | "script" | "deny" | "error");
        if valueless && (value.is_some() || contains.is_some()) {
            return Err(format!("expect: {action} has no value to match"));
        }
        Ok(Expect {
            action,
            value,
            contains,
        })
    }
}

/// A decision in a few words: the action, and its value quoted (a script by its size).
pub fn describe(outcome: &Result<Option<BootAction>, String>) -> String {
    match outcome {
        Ok(None) => "pass".into(),
        Ok(Some(BootAction::Script(s))) => format!("script ({} bytes)", s.len()),
        Ok(Some(a)) => match value_of(a) {
            Some(v) => format!("{} {v:?}", a.name()),
            None => a.name().to_string(),
        },
        Err(e) => format!("error: {e}"),
    }
}

fn value_of(a: &BootAction) -> Option<&str> {
    match a {
        BootAction::Environment(v) | BootAction::Script(v) | BootAction::Deny(v) => Some(v),
        _ => None,
    }
}

impl Expect {
    /// Whether `outcome` is what was expected.
    pub fn holds(&self, outcome: &Result<Option<BootAction>, String>) -> bool {
        let (action, value) = match outcome {
            Ok(None) => ("pass", None),
            Ok(Some(a)) => (a.name(), value_of(a)),
            Err(e) => ("error", Some(e.as_str())),
        };
        action == self.action
            && self.value.as_deref().is_none_or(|v| value == Some(v))
            && self
                .contains
                .as_deref()
                .is_none_or(|c| value.is_some_and(|v| v.contains(c)))
    }

    /// The expectation in the words of [`describe`].
    pub fn words(&self) -> String {
        match (&self.value, &self.contains) {
            (Some(v), _) => format!("{} {v:?}", self.action),
            (None, Some(c)) => format!("{} containing {c:?}", self.action),
            (None, None) => self.action.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(yaml: &str) -> Result<Expect, String> {
        serde_yaml_ng::from_str::<ExpectFile>(yaml).unwrap().check()
    }

    #[test]
    fn expectations_in_words_or_as_a_table() {
        let deny = Ok(Some(BootAction::Deny("on the deny list (macs)".into())));
        assert!(expect("deny").unwrap().holds(&deny));
        assert!(
            expect("{action: deny, contains: deny list}")
                .unwrap()
                .holds(&deny)
        );
        assert!(
            !expect("{action: deny, contains: allow}")
                .unwrap()
                .holds(&deny)
        );
        assert!(!expect("pass").unwrap().holds(&deny));
        let env = Ok(Some(BootAction::Environment("talos".into())));
        assert!(expect("environment talos").unwrap().holds(&env));
        assert!(!expect("environment ubuntu").unwrap().holds(&env));
        assert!(expect("pass").unwrap().holds(&Ok(None)));
        assert!(
            expect("local_disk")
                .unwrap()
                .holds(&Ok(Some(BootAction::LocalDisk)))
        );
        assert!(expect("error").unwrap().holds(&Err("trapped".into())));
        assert!(
            serde_yaml_ng::from_str::<ExpectFile>("{action: deny, contians: x}").is_err(),
            "a misspelt key"
        );
        let e = expect("pass quickly").unwrap_err();
        assert!(e.contains("pass has no value to match"), "{e}");
        let e = expect("boot").unwrap_err();
        assert!(
            e.contains("\"boot\" is not an action (the actions are pass, discover"),
            "{e}"
        );
        assert_eq!(describe(&deny), "deny \"on the deny list (macs)\"");
        assert_eq!(
            describe(&Ok(Some(BootAction::Script("#!ipxe\n".into())))),
            "script (7 bytes)"
        );
    }
}
