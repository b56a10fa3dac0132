//! `[kubernetes]`: Kubernetes mode's section of `appliance.toml`, and its check. Built
//! with or without the controller itself (a build without it still reads the section).

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::Invalid;

/// `[kubernetes]` as written: Kubernetes mode, with the appliance's controller.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSection {
    /// Run the controller against the cluster of this kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Run the controller with the pod's service account (the in-cluster Deployment).
    pub in_cluster: bool,
    /// This appliance's name among those sharing the cluster (a label value): it marks
    /// the Servers it discovered and names its Lease. Default: the host name.
    pub identity: Option<String>,
    /// Namespace of the appliance's Lease, Events and default Secrets.
    pub namespace: String,
    /// Watch Cluster API objects (MetalClusters, MetalMachines, Clusters, Machines) in
    /// this namespace only, as other providers' `--namespace`; default every namespace.
    pub watch_namespace: Option<String>,
    /// What a Server released by its MetalMachine does: `wipe` (boot the wipe
    /// environment; free once it reports) or `power-off` (free at once).
    pub release: Release,
    /// Whether this rack (the appliance's failure domain) may run control-plane machines.
    pub control_plane: bool,
}

/// `[kubernetes] release`.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Release {
    #[default]
    Wipe,
    PowerOff,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        KubernetesSection {
            kubeconfig: None,
            in_cluster: false,
            identity: None,
            namespace: "arges-system".into(),
            watch_namespace: None,
            release: Release::Wipe,
            control_plane: true,
        }
    }
}

/// Kubernetes mode's settings, checked; `None` in [`crate::config::Config`] when the
/// mode is off.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// `None`: in-cluster (service account).
    pub kubeconfig: Option<PathBuf>,
    /// The appliance's identity. Without `identity` in the file it is the host name,
    /// which [`crate::config::Config::load`] reads (and checks) after validation.
    pub identity: String,
    pub namespace: String,
    /// Cluster API objects are watched in this namespace only (`None`: every one).
    pub watch_namespace: Option<String>,
    /// Released servers are wiped (else powered off and free at once).
    pub wipe_on_release: bool,
    /// This rack may run control-plane machines (its failure domain's `controlPlane`).
    pub control_plane: bool,
}

impl KubernetesConfig {
    /// `k`, checked, with the kubeconfig the assembly resolved (the flag's or the
    /// file's); `None` when the mode is off.
    pub fn from_section(
        k: &KubernetesSection,
        kubeconfig: Option<PathBuf>,
        watch_namespace: Option<&str>,
    ) -> Result<Option<Self>, Invalid> {
        if kubeconfig.is_none() && !k.in_cluster {
            return Ok(None);
        }
        if kubeconfig.is_some() && k.in_cluster {
            return Err(Invalid::new(
                "kubernetes.in_cluster",
                "set either kubernetes.kubeconfig or kubernetes.in_cluster, not both",
            ));
        }
        let identity = k.identity.clone().unwrap_or_default();
        if k.identity.is_some() {
            check_identity(&identity)?;
        }
        if !is_dns_label(&k.namespace) {
            return Err(Invalid::new(
                "kubernetes.namespace",
                format!("{:?} is not a namespace name", k.namespace),
            ));
        }
        // The flag's value wins; an empty one (a template's unset variable) means every
        // namespace.
        let watch_namespace = watch_namespace
            .or(k.watch_namespace.as_deref())
            .filter(|ns| !ns.is_empty());
        if let Some(ns) = watch_namespace
            && !is_dns_label(ns)
        {
            return Err(Invalid::new(
                "kubernetes.watch_namespace",
                format!("{ns:?} is not a namespace name"),
            ));
        }
        Ok(Some(KubernetesConfig {
            kubeconfig,
            identity,
            namespace: k.namespace.clone(),
            watch_namespace: watch_namespace.map(String::from),
            wipe_on_release: k.release == Release::Wipe,
            control_plane: k.control_plane,
        }))
    }
}

/// Whether `identity` may name an appliance (a label value).
pub fn check_identity(identity: &str) -> Result<(), Invalid> {
    if is_label_value(identity) {
        return Ok(());
    }
    Err(Invalid::new(
        "kubernetes.identity",
        format!(
            "{identity:?} is not a label value (letters, digits, - and _, at most 63, alphanumeric at both ends)"
        ),
    ))
}

/// Whether `s` may name a namespace (an RFC 1123 label: lower-case letters, digits and
/// `-`, at most 63, alphanumeric at both ends).
pub fn is_dns_label(s: &str) -> bool {
    is_label_value(s)
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `s` is a valid Kubernetes label value (and DNS-label-like: no dots).
pub fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_identity_and_namespace() {
        let off =
            KubernetesConfig::from_section(&KubernetesSection::default(), None, None).unwrap();
        assert!(off.is_none());
        let k = KubernetesSection {
            identity: Some("rack-1".into()),
            ..Default::default()
        };
        let on = KubernetesConfig::from_section(&k, Some("kc".into()), None)
            .unwrap()
            .unwrap();
        assert_eq!(on.identity, "rack-1");
        assert!(on.wipe_on_release);
        let both = KubernetesSection {
            in_cluster: true,
            ..Default::default()
        };
        let e = KubernetesConfig::from_section(&both, Some("kc".into()), None).unwrap_err();
        assert_eq!(e.key, "kubernetes.in_cluster");
        let bad = KubernetesSection {
            identity: Some("Rack 1!".into()),
            ..Default::default()
        };
        let e = KubernetesConfig::from_section(&bad, Some("kc".into()), None).unwrap_err();
        assert_eq!(e.key, "kubernetes.identity");
        assert!(!is_label_value("-a") && !is_label_value("") && is_label_value("a_b-1"));
    }

    #[test]
    fn the_watch_namespace_from_the_flag_or_the_file_and_empty_is_every_one() {
        let k = KubernetesSection {
            identity: Some("rack-1".into()),
            watch_namespace: Some("tenant-a".into()),
            ..Default::default()
        };
        let watched = |flag| {
            KubernetesConfig::from_section(&k, Some("kc".into()), flag)
                .map(|c| c.and_then(|c| c.watch_namespace))
        };
        assert_eq!(watched(None).unwrap().as_deref(), Some("tenant-a"));
        assert_eq!(
            watched(Some("tenant-b")).unwrap().as_deref(),
            Some("tenant-b")
        );
        assert_eq!(watched(Some("")).unwrap(), None);
        let e = watched(Some("Tenant_B")).unwrap_err();
        assert_eq!(e.key, "kubernetes.watch_namespace");
        assert!(is_dns_label("a-1") && !is_dns_label("a_1") && !is_dns_label("A"));
    }
}
