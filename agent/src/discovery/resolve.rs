//! From Kubernetes objects to port groups, as kube-proxy does it:
//! - frontends: every ClusterIP of the frontend Service (`spec.clusterIPs`: both families on a
//!   dual-stack Service) with each selected Service port;
//! - backends: for each Service port, the endpoints of the backend Service's EndpointSlices
//!   whose port has the same name (and protocol). The EndpointSlice controller resolves each
//!   Service's `targetPort` (a number, or a container port name) per pod and publishes it under
//!   the Service port's name, so a frontend port `http` goes to the pods' port named `http`
//!   (8080, say), whatever number that is;
//! - only ready endpoints (`conditions.ready` true or unset; terminating endpoints are never
//!   ready), and only their first address (the API says the others are fungible).
//!
//! Results are sorted and deduplicated, so the same objects always give the same groups: a
//! relist that changes nothing changes nothing in the datapath.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use agent_common::MAX_BACKENDS_PER_SIDE;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{DiscoveryState, KubernetesConfig, PortSelector};
use crate::config::PortGroup;

/// Groups and notes (things worth telling that do not stop steering).
#[derive(Debug, Default, PartialEq)]
pub struct Resolved {
    pub groups: Vec<PortGroup>,
    pub notes: Vec<String>,
}

/// Why a service steers nothing: `Waiting` or `Refused`, and the message for the user.
pub type Unresolved = (DiscoveryState, String);

/// Resolves one service from its frontend Service (if it exists) and the EndpointSlices of its
/// stable and canary Services.
pub fn resolve(
    reference: &KubernetesConfig,
    frontend: Option<&Service>,
    stable: &[&EndpointSlice],
    canary: &[&EndpointSlice],
) -> Result<Resolved, Unresolved> {
    let name = reference.frontend_ref();
    let Some(service) = frontend else {
        return Err((
            DiscoveryState::Waiting,
            format!("Service {name} does not exist (yet): steering nothing until it appears"),
        ));
    };
    let spec = service.spec.as_ref().ok_or_else(|| (DiscoveryState::Refused, format!("Service {name} has no spec")))?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err((
            DiscoveryState::Refused,
            format!("Service {name} is of type ExternalName: it has no ClusterIP to steer; name a Service with a ClusterIP as `frontend`"),
        ));
    }
    let cluster_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let cluster_ips: Vec<&String> = cluster_ips.into_iter().filter(|ip| !ip.is_empty()).collect();
    if cluster_ips.is_empty() || cluster_ips.iter().any(|ip| ip.as_str() == "None") {
        return Err((
            DiscoveryState::Refused,
            format!(
                "Service {name} is headless (clusterIP: None): clients connect straight to its pods, so there is no \
                 ClusterIP to steer; name a Service with a ClusterIP as `frontend`"
            ),
        ));
    }
    let mut ips = Vec::with_capacity(cluster_ips.len());
    for (index, text) in cluster_ips.iter().enumerate() {
        let ip: IpAddr = text.parse().map_err(|_| {
            (DiscoveryState::Refused, format!("Service {name}: spec.clusterIPs[{index}] {text:?} is not an IP address"))
        })?;
        ips.push(ip);
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut notes = Vec::new();
    let selected: Vec<_> = if reference.ports.is_empty() {
        ports.iter().collect()
    } else {
        let mut selected = Vec::new();
        for selector in &reference.ports {
            let found = ports.iter().find(|p| match selector {
                PortSelector::Number(n) => i64::from(p.port) == *n,
                PortSelector::Name(wanted) => p.name.as_deref() == Some(wanted.as_str()),
            });
            match found {
                Some(port) => selected.push(port),
                None => notes.push(format!("Service {name} has no port {selector}")),
            }
        }
        selected
    };
    if selected.is_empty() {
        let why = if notes.is_empty() { format!("Service {name} has no ports") } else { notes.join("; ") };
        return Err((DiscoveryState::Refused, why));
    }

    let mut groups = Vec::new();
    let mut frontends_seen = BTreeSet::new();
    for port in selected {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let port_name = port.name.as_deref().unwrap_or("");
        let label = if port_name.is_empty() { port.port.to_string() } else { format!("{port_name:?}") };
        if protocol == "SCTP" {
            notes.push(format!("port {label} is SCTP: not steered"));
            continue;
        }
        let Ok(number) = u16::try_from(port.port) else { continue };
        let frontends: Vec<SocketAddr> = ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, number))
            // Two Service ports with one number (DNS: 53/TCP and 53/UDP) are one frontend to
            // the socket hooks: the first keeps it.
            .filter(|f| frontends_seen.insert(*f))
            .collect();
        if frontends.is_empty() {
            continue;
        }
        let mut sides = Vec::new();
        for (side, service, slices) in
            [("stable", Some(&reference.stable), stable), ("canary", reference.canary.as_ref(), canary)]
        {
            let Some(service) = service else {
                sides.push(Vec::new());
                continue;
            };
            let (addrs, truncated) = ready_endpoints(slices, port_name, protocol);
            if addrs.is_empty() {
                notes.push(format!("{side} Service {service} has no ready endpoint for port {label}"));
            }
            if truncated {
                notes.push(format!(
                    "{side} Service {service} has more than {MAX_BACKENDS_PER_SIDE} ready endpoints per family for port \
                     {label}: the first {MAX_BACKENDS_PER_SIDE} (by address) are used"
                ));
            }
            sides.push(addrs);
        }
        let mut canary = sides.pop().unwrap_or_default();
        let stable = sides.pop().unwrap_or_default();
        // Weight 0 and `never` cohorts must mean no canary traffic, which needs a stable pod of
        // the connection's family to send it to (the config-file rule, which refuses the
        // service; here endpoints come and go, so the family is left to the ClusterIP, that
        // is to kube-proxy, until stable has a ready endpoint in it again).
        for v4 in [true, false] {
            let in_family = |a: &SocketAddr| a.is_ipv4() == v4;
            if canary.iter().any(in_family) && !stable.iter().any(in_family) {
                canary.retain(|a| !in_family(a));
                notes.push(format!(
                    "port {label}: stable has no ready IPv{v} endpoint but canary has: IPv{v} connections are not \
                     steered (they reach the ClusterIP as without sockshift) until stable has one",
                    v = if v4 { 4 } else { 6 }
                ));
            }
        }
        groups.push(PortGroup { frontends, stable, canary });
    }
    Ok(Resolved { groups, notes })
}

/// The ready endpoints of `slices` on the endpoint port named `port_name`, sorted, at most
/// `MAX_BACKENDS_PER_SIDE` per family; and whether some were left out for that limit.
fn ready_endpoints(slices: &[&EndpointSlice], port_name: &str, protocol: &str) -> (Vec<SocketAddr>, bool) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue; // FQDN slices name hosts, not addresses
        }
        let port = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name && p.protocol.as_deref().unwrap_or("TCP") == protocol
        });
        let Some(number) = port.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Unset means ready (the API's rule); terminating endpoints are never ready.
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let Some(ip) = endpoint.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            let addr = SocketAddr::new(ip, number);
            if ip.is_ipv4() {
                v4.insert(addr);
            } else {
                v6.insert(addr);
            }
        }
    }
    let limit = MAX_BACKENDS_PER_SIDE as usize;
    let truncated = v4.len() > limit || v6.len() > limit;
    (v4.into_iter().take(limit).chain(v6.into_iter().take(limit)).collect(), truncated)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::*;

    fn reference(ports: Vec<PortSelector>) -> KubernetesConfig {
        KubernetesConfig {
            namespace: "shop".into(),
            frontend: "web".into(),
            stable: "web-stable".into(),
            canary: Some("web-canary".into()),
            ports,
        }
    }

    fn service(cluster_ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ips.first().map(|s| s.to_string()),
                cluster_ips: Some(cluster_ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, target)| ServicePort {
                            name: (!name.is_empty()).then(|| name.to_string()),
                            port: *port,
                            target_port: Some(IntOrString::String(target.to_string())),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(family: &str, ports: &[(&str, i32)], endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.to_string()),
                        port: Some(*port),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: endpoints
                .iter()
                .map(|(addr, ready)| Endpoint {
                    addresses: vec![addr.to_string()],
                    conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn named_ports_resolve_like_kube_proxy() {
        // Service port http (80) → endpoint port named http (8080); https (443) → 8443.
        let svc = service(&["10.96.0.10", "fd00::10"], &[("http", 80, "web"), ("https", 443, "tls")]);
        let stable = slice("IPv4", &[("https", 8443), ("http", 8080)], &[("10.0.1.6", None), ("10.0.1.5", Some(true))]);
        let stable6 = slice("IPv6", &[("http", 8080)], &[("fd00::1:5", Some(true))]);
        let canary = slice("IPv4", &[("http", 8080)], &[("10.0.2.7", Some(true)), ("10.0.2.8", Some(false))]);
        let resolved = resolve(&reference(vec![]), Some(&svc), &[&stable, &stable6], &[&canary]).unwrap();
        assert_eq!(resolved.groups.len(), 2);
        let http = &resolved.groups[0];
        assert_eq!(http.frontends, addrs(&["10.96.0.10:80", "[fd00::10]:80"]));
        assert_eq!(http.stable, addrs(&["10.0.1.5:8080", "10.0.1.6:8080", "[fd00::1:5]:8080"]));
        assert_eq!(http.canary, addrs(&["10.0.2.7:8080"]), "not-ready endpoints are left out");
        let https = &resolved.groups[1];
        assert_eq!(https.frontends, addrs(&["10.96.0.10:443", "[fd00::10]:443"]));
        assert_eq!(https.stable, addrs(&["10.0.1.5:8443", "10.0.1.6:8443"]));
        assert!(https.canary.is_empty());
        assert!(resolved
            .notes
            .iter()
            .any(|n| n.contains("canary Service web-canary has no ready endpoint for port \"https\"")));
    }

    #[test]
    fn ports_select_by_name_or_number_and_missing_ones_are_named() {
        let svc = service(&["10.96.0.10"], &[("http", 80, "http"), ("metrics", 9090, "metrics")]);
        let stable = slice("IPv4", &[("http", 8080), ("metrics", 9091)], &[("10.0.1.5", None)]);
        let by_number = resolve(&reference(vec![PortSelector::Number(9090)]), Some(&svc), &[&stable], &[]).unwrap();
        assert_eq!(by_number.groups.len(), 1);
        assert_eq!(by_number.groups[0].stable, addrs(&["10.0.1.5:9091"]));
        let partly = resolve(
            &reference(vec![PortSelector::Name("http".into()), PortSelector::Name("grpc".into())]),
            Some(&svc),
            &[&stable],
            &[],
        )
        .unwrap();
        assert_eq!(partly.groups.len(), 1);
        assert!(partly.notes.iter().any(|n| n.contains("no port \"grpc\"")), "{:?}", partly.notes);
        let none = resolve(&reference(vec![PortSelector::Name("grpc".into())]), Some(&svc), &[&stable], &[]);
        assert_eq!(none.unwrap_err().0, DiscoveryState::Refused);
    }

    #[test]
    fn unnamed_single_port_matches_the_unnamed_endpoint_port() {
        let svc = service(&["10.96.0.10"], &[("", 80, "8080")]);
        let stable = slice("IPv4", &[("", 8080)], &[("10.0.1.5", None)]);
        let resolved = resolve(&reference(vec![]), Some(&svc), &[&stable], &[]).unwrap();
        assert_eq!(resolved.groups[0].stable, addrs(&["10.0.1.5:8080"]));
    }

    #[test]
    fn headless_external_name_and_missing_services_steer_nothing() {
        let headless = service(&["None"], &[("http", 80, "http")]);
        let (state, message) = resolve(&reference(vec![]), Some(&headless), &[], &[]).unwrap_err();
        assert_eq!(state, DiscoveryState::Refused);
        assert!(message.contains("headless"), "{message}");
        let mut external = service(&[], &[]);
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert!(resolve(&reference(vec![]), Some(&external), &[], &[]).unwrap_err().1.contains("ExternalName"));
        let (state, message) = resolve(&reference(vec![]), None, &[], &[]).unwrap_err();
        assert_eq!(state, DiscoveryState::Waiting);
        assert!(message.contains("shop/web does not exist"), "{message}");
    }

    #[test]
    fn a_family_only_the_canary_has_is_left_unsteered_until_stable_has_it() {
        // Dual-stack canary, stable ready in IPv4 only: at weight 0 an IPv6 client would have
        // no stable pod to go to, so the canary's IPv6 pods are not steered to at all.
        let svc = service(&["10.96.0.10", "fd00::10"], &[("http", 80, "http")]);
        let stable = slice("IPv4", &[("http", 8080)], &[("10.0.1.5", None)]);
        let stable6 = slice("IPv6", &[("http", 8080)], &[("fd00::1:5", Some(false))]);
        let canary = slice("IPv4", &[("http", 8080)], &[("10.0.2.7", None)]);
        let canary6 = slice("IPv6", &[("http", 8080)], &[("fd00::2:7", None)]);
        let resolved = resolve(&reference(vec![]), Some(&svc), &[&stable, &stable6], &[&canary, &canary6]).unwrap();
        assert_eq!(resolved.groups[0].stable, addrs(&["10.0.1.5:8080"]));
        assert_eq!(resolved.groups[0].canary, addrs(&["10.0.2.7:8080"]));
        assert!(
            resolved.notes.iter().any(|n| n.contains("stable has no ready IPv6 endpoint but canary has")),
            "{:?}",
            resolved.notes
        );
        // Once the stable IPv6 pod is ready, both families are steered.
        let stable6 = slice("IPv6", &[("http", 8080)], &[("fd00::1:5", Some(true))]);
        let resolved = resolve(&reference(vec![]), Some(&svc), &[&stable, &stable6], &[&canary, &canary6]).unwrap();
        assert_eq!(resolved.groups[0].canary, addrs(&["10.0.2.7:8080", "[fd00::2:7]:8080"]));
        assert!(resolved.notes.is_empty(), "{:?}", resolved.notes);
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let svc = service(&["10.96.0.10"], &[("http", 80, "http")]);
        let a = slice("IPv4", &[("http", 8080)], &[("10.0.1.6", None), ("10.0.1.5", None)]);
        let b = slice("IPv4", &[("http", 8080)], &[("10.0.1.5", None)]);
        let one = resolve(&reference(vec![]), Some(&svc), &[&a, &b], &[]).unwrap();
        let other = resolve(&reference(vec![]), Some(&svc), &[&b, &a], &[]).unwrap();
        assert_eq!(one, other);
        assert_eq!(one.groups[0].stable, addrs(&["10.0.1.5:8080", "10.0.1.6:8080"]));
    }
}
