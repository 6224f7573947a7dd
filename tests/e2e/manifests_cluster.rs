//! config/daemonset-cluster.yaml, checked like config/daemonset.yaml (tests/e2e/manifests.rs):
//! valid Kubernetes (kubernetes-validate, strict, offline), a ConfigMap the agent's own parser
//! accepts in cluster mode, NODE_NAME from the downward API and the etcd client certificate from
//! the Secret wired to what `[cluster]` reads, and the same least-privilege settings as the
//! single-node manifest. Needs python3 with kubernetes-validate (`cargo xtask test` installs
//! it) and fails, rather than skips, without it. tests/e2e/daemonset.rs runs the pod for real.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use agent::config::Config;
use serde::Deserialize;
use serde_norway::Value;

const KUBERNETES_VERSION: &str = "1.37.0";
const CONFIG_KEY: &str = "sockshift.toml";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").join(relative)
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|err| panic!("{}: {err}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn resource<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name:?}");
    found[0]
}

fn cluster_docs() -> Vec<Value> {
    documents(&repo_path("config/daemonset-cluster.yaml"))
}

/// The agent's config from the ConfigMap, as the agent parses it in a pod whose NODE_NAME the
/// kubelet set.
fn cluster_config(docs: &[Value]) -> (String, Config) {
    let text = resource(docs, "ConfigMap", "sockshift-config")["data"][CONFIG_KEY]
        .as_str()
        .expect("the ConfigMap's sockshift.toml")
        .to_owned();
    // Only this test file reads NODE_NAME.
    std::env::set_var("NODE_NAME", "worker-7");
    // The token files are the Secret's: parse with stand-ins, as tests/e2e/manifests.rs does.
    let parsed = e2e::with_stand_in_token_files(&text);
    let config = Config::parse(&parsed).unwrap_or_else(|err| panic!("the agent rejects the ConfigMap: {err}\n{text}"));
    (text, config)
}

fn container(daemonset: &Value) -> &Value {
    &daemonset["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn kubernetes_validate_strict_accepts_the_cluster_manifest() {
    let path = repo_path("config/daemonset-cluster.yaml");
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&path)
        .output()
        .unwrap_or_else(|err| panic!("cannot run python3 ({err}): `cargo xtask test` installs kubernetes-validate"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("No module named kubernetes_validate"), "`cargo xtask test` installs kubernetes-validate");
    assert!(out.status.success(), "kubernetes-validate rejects {}:\n{text}", path.display());
    let minor = KUBERNETES_VERSION.rsplit_once('.').unwrap().0;
    for resource in
        ["namespace/sockshift", "serviceaccount/sockshift", "configmap/sockshift-config", "daemonset/sockshift"]
    {
        let line = format!("passed for resource {resource} against version {minor}");
        assert!(text.contains(&line), "kubernetes-validate did not validate {resource}:\n{text}");
    }
    assert!(text.lines().all(|l| l.starts_with("INFO ")), "kubernetes-validate warned:\n{text}");
}

#[test]
fn the_configmap_is_cluster_mode_with_no_services() {
    let docs = cluster_docs();
    let (text, config) = cluster_config(&docs);
    let cluster = config.cluster.expect("[cluster] is set");
    assert_eq!(cluster.node, "worker-7", "node_env = \"NODE_NAME\": the node name comes from the pod's environment");
    assert!(config.services.is_empty());
    assert!(cluster.endpoints.iter().all(|e| e.starts_with("https://")), "etcd over TLS: {:?}", cluster.endpoints);
    let tls = cluster.tls.expect("TLS settings");
    assert!(tls.identity.is_some(), "a client certificate is configured");
    // The same file with a [[service]] table is refused, naming how to load services.
    let with_service = format!(
        "{}\n[[service]]\nname = \"web\"\nfrontends = [\"10.96.0.10:80\"]\n",
        e2e::with_stand_in_token_files(&text)
    );
    let err = Config::parse(&with_service).expect_err("refused").to_string();
    assert!(err.contains("sockshift apply -f"), "{err}");
}

#[test]
fn node_name_and_etcd_certificates_are_wired_to_what_the_config_reads() {
    let docs = cluster_docs();
    let (_, config) = cluster_config(&docs);
    let daemonset = resource(&docs, "DaemonSet", "sockshift");
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = container(daemonset);

    // NODE_NAME from the downward API.
    let env = container["env"].as_sequence().expect("env");
    let node_name = env.iter().find(|e| e["name"].as_str() == Some("NODE_NAME")).expect("NODE_NAME in env");
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"), "a hostNetwork pod resolving etcd's names");

    // Every TLS file [cluster] names is a key of the Secret volume, mounted read-only.
    let tls = config.cluster.unwrap().tls.unwrap();
    let (cert, key) = tls.identity.unwrap();
    for file in [&tls.ca_file, &cert, &key] {
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| file.parent() == Some(Path::new(m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("no volume is mounted at {}", file.parent().unwrap().display()));
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{mount:?}");
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("sockshift-etcd-client"), "{volume:?}");
        let mode = volume["secret"]["defaultMode"].as_u64().expect("defaultMode");
        assert_eq!(mode & 0o077, 0, "the key is readable by its owner only: {mode:o}");
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(["ca.crt", "tls.crt", "tls.key"].contains(&name), "{name} is not a key the README tells to create");
    }
    // The Secret is the operator's: the manifest must not ship one (nor placeholder keys).
    assert!(docs.iter().all(|d| d["kind"].as_str() != Some("Secret")), "the manifest ships a Secret");
}

#[test]
fn the_cluster_daemonset_keeps_the_single_node_security_and_probes() {
    let cluster = cluster_docs();
    let single = documents(&repo_path("config/daemonset.yaml"));
    let (cluster_ds, single_ds) =
        (resource(&cluster, "DaemonSet", "sockshift"), resource(&single, "DaemonSet", "sockshift"));
    let (c, s) = (container(cluster_ds), container(single_ds));
    for field in ["securityContext", "livenessProbe", "readinessProbe", "resources", "command", "image"] {
        assert_eq!(c[field], s[field], "{field} differs between the two DaemonSets");
    }
    let (cp, sp) = (&cluster_ds["spec"]["template"]["spec"], &single_ds["spec"]["template"]["spec"]);
    for field in
        ["hostNetwork", "hostPID", "hostIPC", "priorityClassName", "tolerations", "automountServiceAccountToken"]
    {
        assert_eq!(cp[field], sp[field], "pod {field} differs between the two DaemonSets");
    }
    // Every mount of the single-node pod is there too, the same way.
    for mount in s["volumeMounts"].as_sequence().unwrap() {
        assert!(c["volumeMounts"].as_sequence().unwrap().contains(mount), "{mount:?} is missing in cluster mode");
    }
    // Kubernetes discovery works in cluster mode too (each node resolves its services' Kubernetes
    // names itself): the same token and exactly the same read-only role and binding
    // (tests/e2e/manifests.rs checks those grant get/list/watch on Services and EndpointSlices only).
    assert_eq!(
        resource(&cluster, "ServiceAccount", "sockshift")["automountServiceAccountToken"],
        resource(&single, "ServiceAccount", "sockshift")["automountServiceAccountToken"],
        "the ServiceAccount's token mounting differs between the two manifests"
    );
    for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        let of = |docs: &[Value]| -> Vec<Value> {
            docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).cloned().collect()
        };
        assert_eq!(of(&cluster), of(&single), "the {kind}s differ between the two manifests");
    }
}
