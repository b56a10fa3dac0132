//! iPXE boot scripts: the template language ([`template`], [`render`]) and the set of
//! templates the appliance renders, built in and overridable from the config.
//!
//! Every template is rendered against the same context:
//!
//! | name | what |
//! |---|---|
//! | `action` | `discover`, `environment`, `wipe`, `local-disk` or `deny` |
//! | `appliance.url` | base URL of the appliance as the machine reaches it |
//! | `appliance.agent_url` | where an agent registers: the HTTPS URL when the appliance serves HTTPS, else `appliance.url` |
//! | `appliance.pin` | the sha256 of the HTTPS certificate, for the agent to pin ("" without HTTPS) |
//! | `machine.uuid`, `.mac`, `.arch`, `.address` | what the machine said, and its source address |
//! | `server` | the inventory record (`id`, `accepted`, `cordoned`, `labels`, `hardware`, …) or empty |
//! | `env.name`, `.kernel_url`, `.kernel_name`, `.initrds[].name`, `.initrds[].url`, `.cmdline` | the environment to boot |
//! | `boot_token` | this boot's `/configdata` token: only for the claimant of a provisioning window, empty otherwise |
//! | `registration_token` | this boot's registration secret (discover and wipe boots): single-use, bound to the boot; never the shared token |
//! | `local_disk.method` | `exit`, `sanboot` or `http-404` |
//! | `reason` | why a boot was denied |
//!
//! An environment's kernel command line is itself a template rendered with this context
//! (without `env.cmdline`), then placed into the script as `env.cmdline`.

pub mod config;
pub mod render;
pub mod template;

use std::path::Path;

pub use template::{Template, TemplateError};

/// The scripts the appliance renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScriptKind {
    Discover,
    Environment,
    LocalDisk,
    Wipe,
    Deny,
}

impl ScriptKind {
    /// Every kind, for validation.
    pub const ALL: [ScriptKind; 5] = [
        ScriptKind::Discover,
        ScriptKind::Environment,
        ScriptKind::LocalDisk,
        ScriptKind::Wipe,
        ScriptKind::Deny,
    ];

    /// The kind's name in config and in the `action` variable.
    pub fn name(self) -> &'static str {
        match self {
            ScriptKind::Discover => "discover",
            ScriptKind::Environment => "environment",
            ScriptKind::LocalDisk => "local-disk",
            ScriptKind::Wipe => "wipe",
            ScriptKind::Deny => "deny",
        }
    }

    fn builtin(self) -> &'static str {
        match self {
            ScriptKind::Discover | ScriptKind::Environment | ScriptKind::Wipe => {
                include_str!("builtin/environment.ipxe")
            }
            ScriptKind::LocalDisk => include_str!("builtin/local-disk.ipxe"),
            ScriptKind::Deny => include_str!("builtin/deny.ipxe"),
        }
    }
}

/// The compiled templates, one per [`ScriptKind`].
#[derive(Debug, Clone)]
pub struct Templates {
    compiled: Vec<(ScriptKind, Template)>,
}

impl Templates {
    /// The built-in set.
    pub fn builtin() -> Self {
        let compiled = ScriptKind::ALL
            .iter()
            .map(|k| {
                let t = Template::parse(k.name(), k.builtin())
                    .unwrap_or_else(|e| panic!("built-in template is broken: {e}"));
                (*k, t)
            })
            .collect();
        Templates { compiled }
    }

    /// Replaces the template of `kind` with the source `src` (named by `origin` in errors).
    pub fn set(&mut self, kind: ScriptKind, origin: &str, src: &str) -> Result<(), TemplateError> {
        let t = Template::parse(origin, src)?;
        for (k, slot) in &mut self.compiled {
            if *k == kind {
                *slot = t;
                break;
            }
        }
        Ok(())
    }

    /// Replaces the template of `kind` with the contents of `path`.
    pub fn load(&mut self, kind: ScriptKind, path: &Path) -> Result<(), TemplateError> {
        let src = std::fs::read_to_string(path).map_err(|e| TemplateError {
            template: path.display().to_string(),
            pos: template::Pos::default(),
            message: format!("cannot read: {e}"),
        })?;
        self.set(kind, &path.display().to_string(), &src)
    }

    /// The template for `kind`.
    pub fn get(&self, kind: ScriptKind) -> &Template {
        // Every kind is present: `builtin` fills them all and `set` only replaces.
        &self
            .compiled
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind has a template")
            .1
    }
}

/// A representative render context, with every variable the table above lists: for
/// tests, benches and anyone writing a template.
pub fn example_context(action: &str) -> serde_json::Value {
    serde_json::json!({
        "action": action,
        "appliance": {"url": "http://10.0.0.1:8080"},
        "machine": {"uuid": "4c4c4544-0042-3510-8051-b4c04f595031", "mac": "52:54:00:12:34:56", "arch": "x86_64", "address": "10.0.0.7"},
        "server": {},
        "env": {
            "name": "discovery",
            "kernel_url": "http://10.0.0.1:8080/env/discovery/vmlinuz",
            "kernel_name": "vmlinuz",
            "initrds": [{"name": "initramfs.img", "url": "http://10.0.0.1:8080/env/discovery/initramfs.img"}],
            "cmdline": "console=ttyS0 arges.token=abc",
        },
        "boot_token": "t0k",
        "registration_token": "r3g",
        "local_disk": {"method": "sanboot"},
        "reason": "not allowed",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_render() {
        let t = Templates::builtin();
        let env = t
            .get(ScriptKind::Environment)
            .render(&example_context("environment"))
            .unwrap();
        assert_eq!(
            env,
            "#!ipxe\n# Arges: environment discovery for 4c4c4544-0042-3510-8051-b4c04f595031\n\
             kernel http://10.0.0.1:8080/env/discovery/vmlinuz initrd=initramfs.img console=ttyS0 arges.token=abc\n\
             initrd --name initramfs.img http://10.0.0.1:8080/env/discovery/initramfs.img\nboot\n"
        );
        let disk = t
            .get(ScriptKind::LocalDisk)
            .render(&example_context("local-disk"))
            .unwrap();
        assert!(
            disk.contains("\nsanboot --no-describe --drive 0x80 || exit\n"),
            "{disk}"
        );
        assert!(!disk.contains("\nexit\n"));
        let deny = t
            .get(ScriptKind::Deny)
            .render(&example_context("deny"))
            .unwrap();
        assert!(
            deny.contains(": not allowed\n"),
            "a readable reason: {deny}"
        );
    }

    #[test]
    fn override_is_checked() {
        let mut t = Templates::builtin();
        let e = t
            .set(
                ScriptKind::Discover,
                "discover.ipxe",
                "#!ipxe\n{% if x %}\n",
            )
            .unwrap_err();
        assert_eq!(e.pos.line, 2);
        t.set(
            ScriptKind::Discover,
            "discover.ipxe",
            "#!ipxe\nchain {{ appliance.url }}/x\n",
        )
        .unwrap();
        assert_eq!(
            t.get(ScriptKind::Discover)
                .render(&example_context("discover"))
                .unwrap(),
            "#!ipxe\nchain http://10.0.0.1:8080/x\n"
        );
    }
}
