//! `[service.kubernetes]`: a service named by Kubernetes objects instead of addresses, and its
//! validation (object names as the API server would accept them, ports by name or number).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::InvalidField;

/// `[service.kubernetes]` (API: the `kubernetes` object of a service). The frontends are the
/// ClusterIPs (both families on a dual-stack Service) and ports of `frontend`; the stable and
/// canary backends are the ready endpoints of the EndpointSlices of `stable` and `canary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = Kubernetes)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace of all three Services.
    pub namespace: String,
    /// Service whose ClusterIP(s) and ports clients connect to.
    pub frontend: String,
    /// Service whose ready endpoints are the stable backends (may be `frontend` itself).
    pub stable: String,
    /// Service whose ready endpoints are the canary backends; unset: no canary side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// Which ports of `frontend` are steered, by name or number; empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSelector>,
}

/// A Service port named by its `name` or its `port` number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PortSelector {
    /// `port` of a Service port (not its targetPort): 1 to 65535.
    Number(i64),
    Name(String),
}

impl std::fmt::Display for PortSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortSelector::Number(n) => write!(f, "{n}"),
            PortSelector::Name(name) => write!(f, "{name:?}"),
        }
    }
}

impl KubernetesConfig {
    /// `namespace/frontend`, how kubectl users name it.
    pub fn frontend_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.frontend)
    }

    /// Checks names and ports as the API server would; `field` names the table (e.g.
    /// `service[0] "web".kubernetes`).
    pub fn validate(&self, field: &str) -> Result<(), InvalidField> {
        let sub = |name: &str| format!("{field}.{name}");
        if !dns1123_label(&self.namespace) {
            return Err(InvalidField::new(
                sub("namespace"),
                format!("{:?} is not a Kubernetes namespace name (1 to 63 of a-z, 0-9, '-', starting and ending alphanumeric)", self.namespace),
            ));
        }
        let mut names = vec![("frontend", &self.frontend), ("stable", &self.stable)];
        if let Some(canary) = &self.canary {
            names.push(("canary", canary));
        }
        for (key, name) in names {
            if !dns1035_label(name) {
                return Err(InvalidField::new(
                    sub(key),
                    format!(
                        "{name:?} is not a Kubernetes Service name (1 to 63 of a-z, 0-9, '-', starting with a letter)"
                    ),
                ));
            }
        }
        if self.canary.as_ref() == Some(&self.stable) {
            return Err(InvalidField::new(sub("canary"), "must be a different Service than `stable`"));
        }
        let mut seen = HashSet::new();
        for (index, port) in self.ports.iter().enumerate() {
            let field = format!("{field}.ports[{index}]");
            match port {
                PortSelector::Number(n) if !(1..=65535).contains(n) => {
                    return Err(InvalidField::new(field, format!("port {n} is not within 1 to 65535")));
                }
                PortSelector::Name(name) if !port_name(name) => {
                    return Err(InvalidField::new(
                        field,
                        format!("{name:?} is not a Service port name (1 to 15 of a-z, 0-9, '-', with a letter); a number is written without quotes"),
                    ));
                }
                _ => {}
            }
            if !seen.insert(port) {
                return Err(InvalidField::new(field, format!("port {port} is listed twice")));
            }
        }
        Ok(())
    }
}

/// RFC 1123 label: namespace names.
fn dns1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// RFC 1035 label: Service names (must start with a letter).
fn dns1035_label(name: &str) -> bool {
    dns1123_label(name) && name.as_bytes()[0].is_ascii_lowercase()
}

/// IANA service name, as Kubernetes validates Service port names.
fn port_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=15).contains(&bytes.len())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> KubernetesConfig {
        KubernetesConfig {
            namespace: "shop".into(),
            frontend: "web".into(),
            stable: "web-stable".into(),
            canary: Some("web-canary".into()),
            ports: vec![PortSelector::Name("http".into()), PortSelector::Number(443)],
        }
    }

    #[test]
    fn good_reference_is_accepted() {
        reference().validate("kubernetes").unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        /// A change that breaks the reference, and the field the error must name.
        type Case = (fn(&mut KubernetesConfig), &'static str);
        let cases: [Case; 8] = [
            (|k| k.namespace = "Shop".into(), "kubernetes.namespace"),
            (|k| k.namespace = String::new(), "kubernetes.namespace"),
            (|k| k.frontend = "1web".into(), "kubernetes.frontend"),
            (|k| k.stable = "web_stable".into(), "kubernetes.stable"),
            (|k| k.canary = Some("web-stable".into()), "kubernetes.canary"),
            (|k| k.ports = vec![PortSelector::Number(70000)], "kubernetes.ports[0]"),
            (|k| k.ports = vec![PortSelector::Name("8080".into())], "kubernetes.ports[0]"),
            (|k| k.ports.push(PortSelector::Number(443)), "kubernetes.ports[2]"),
        ];
        for (change, field) in cases {
            let mut k = reference();
            change(&mut k);
            let err = k.validate("kubernetes").expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn ports_parse_by_name_and_number() {
        let k: KubernetesConfig =
            toml::from_str("namespace = \"shop\"\nfrontend = \"web\"\nstable = \"web\"\nports = [\"http\", 8443]")
                .unwrap();
        assert_eq!(k.ports, [PortSelector::Name("http".into()), PortSelector::Number(8443)]);
        assert_eq!(k.canary, None);
        let unknown =
            toml::from_str::<KubernetesConfig>("namespace = \"a\"\nfrontend = \"b\"\nstable = \"c\"\nnamspace = 1");
        assert!(unknown.unwrap_err().to_string().contains("namspace"));
    }
}
