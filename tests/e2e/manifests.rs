//! Deployment files: config/daemonset.yaml is valid Kubernetes (kubernetes-validate, strict,
//! against the schemas it bundles, offline), its ConfigMap holds a config the agent's own parser
//! accepts, its DaemonSet keeps the least-privilege settings and probes consistent with that
//! config, and its RBAC grants exactly get/list/watch on Services and EndpointSlices (Kubernetes
//! discovery) to the agent's ServiceAccount. Needs neither root nor the kernel datapath; needs python3 with kubernetes-validate
//! (`cargo xtask test` installs it) and fails, rather than skips, without it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use agent::config::Config;
use serde::Deserialize;
use serde_norway::Value;

/// Kubernetes version whose schemas the manifest is validated against.
const KUBERNETES_VERSION: &str = "1.37.0";
/// Capabilities the agent's container adds, and nothing else (see the manifest's comments;
/// tests/e2e/daemonset.rs proves in a real pod that each one is needed and that they suffice).
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
const CONFIG_KEY: &str = "sockshift.toml";

fn manifest_path() -> PathBuf {
    // CARGO_MANIFEST_DIR is tests/; the manifest is in the repository's config/.
    let tests_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests_dir.parent().expect("tests/ has a parent").join("config/daemonset.yaml")
}

fn manifest_text() -> String {
    let path = manifest_path();
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// Every non-empty YAML document of the manifest.
fn documents() -> Vec<Value> {
    serde_norway::Deserializer::from_str(&manifest_text())
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|err| panic!("config/daemonset.yaml: {err}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one document of this kind and name.
fn resource(docs: &[Value], kind: &str, name: &str) -> Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "config/daemonset.yaml must hold exactly one {kind} {name:?}");
    found[0].clone()
}

/// `value` at a dotted path; panics naming the path if it is missing.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(value, |v, key| {
        let next = match key.parse::<usize>() {
            Ok(index) => v.get(index),
            Err(_) => v.get(key),
        };
        next.unwrap_or_else(|| panic!("config/daemonset.yaml: {path} is missing (at {key:?})"))
    })
}

fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path).as_str().unwrap_or_else(|| panic!("{path} must be a string, is {:?}", at(value, path)))
}

fn strings_at(value: &Value, path: &str) -> Vec<String> {
    at(value, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path} must be a list"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("{path} must hold strings, holds {v:?}")).to_owned())
        .collect()
}

/// The agent's TOML from the ConfigMap, and what the agent's own parser makes of it.
fn agent_config(docs: &[Value]) -> (String, Config) {
    let config_map = resource(docs, "ConfigMap", "sockshift-config");
    assert_eq!(str_at(&config_map, "metadata.namespace"), "sockshift");
    // Not through `str_at`: the key itself contains a dot.
    let text = at(&config_map, "data")
        .get(CONFIG_KEY)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("ConfigMap sockshift-config must hold the string data.{CONFIG_KEY:?}"))
        .to_owned();
    // The token files come from the Secret volume on a node; stand in for them here (mode 0400,
    // as the volume's defaultMode makes them) so the agent's parser checks them as it would there.
    let parsed = e2e::with_stand_in_token_files(&text);
    match Config::parse(&parsed) {
        Ok(config) => (text, config),
        Err(err) => panic!("the agent rejects the ConfigMap's {CONFIG_KEY}: {err}\n---\n{text}"),
    }
}

/// Runs kubernetes-validate; its exit status and combined output.
fn kubernetes_validate(file: &Path) -> (bool, String) {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION]).arg(file);
    let out = cmd.output().unwrap_or_else(|err| {
        panic!("cannot run python3 ({err}): kubernetes-validate needs it; `cargo xtask test` installs the tools")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if text.contains("No module named kubernetes_validate") {
        panic!(
            "the Python package kubernetes-validate is not installed: `cargo xtask test` installs it \
             (or `python3 -m pip install kubernetes-validate`)\n{text}"
        );
    }
    (out.status.success(), text)
}

#[test]
fn kubernetes_validate_strict_accepts_the_manifest() {
    let path = manifest_path();
    let (ok, output) = kubernetes_validate(&path);
    assert!(ok, "kubernetes-validate --strict -k {KUBERNETES_VERSION} rejects {}:\n{output}", path.display());

    // It exits 0 when it has no schema for a kind (a WARN line), so check that every resource was
    // really validated, and against the version asked for.
    let minor = KUBERNETES_VERSION.rsplit_once('.').unwrap().0;
    for resource in [
        "namespace/sockshift",
        "serviceaccount/sockshift",
        "clusterrole/sockshift",
        "clusterrolebinding/sockshift",
        "configmap/sockshift-config",
        "daemonset/sockshift",
    ] {
        let line = format!("passed for resource {resource} against version {minor}");
        assert!(output.contains(&line), "kubernetes-validate did not validate {resource}:\n{output}");
    }
    let unexpected: Vec<&str> = output.lines().filter(|l| !l.starts_with("INFO ")).collect();
    assert!(unexpected.is_empty(), "kubernetes-validate warned or failed:\n{output}");
}

#[test]
fn kubernetes_validate_strict_rejects_an_unknown_field() {
    // The control for the test above: the schemas are there and strict mode is on, so a
    // misspelt field (which Kubernetes would drop with only a warning) fails.
    let text = manifest_text();
    assert!(text.contains("readOnlyRootFilesystem: true"), "the manifest must set readOnlyRootFilesystem: true");
    let broken = text.replacen("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", 1);
    let path = std::env::temp_dir().join(format!("sockshift-manifests-{}.yaml", std::process::id()));
    std::fs::write(&path, broken).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    let (ok, output) = kubernetes_validate(&path);
    let _ = std::fs::remove_file(&path);
    assert!(!ok, "kubernetes-validate --strict accepted a misspelt field:\n{output}");
    assert!(output.contains("readOnlyRootFilesytem"), "the rejection names another problem:\n{output}");
}

#[test]
fn configmap_holds_a_config_the_agent_accepts() {
    let docs = documents();
    let (text, config) = agent_config(&docs);
    assert!(!config.services.is_empty(), "the ConfigMap's {CONFIG_KEY} should show a [[service]]:\n{text}");
    assert_eq!(config.api, "127.0.0.1:9477".parse::<SocketAddr>().unwrap(), "agent.api");
    assert_eq!(config.bpffs, Path::new("/sys/fs/bpf/sockshift"), "agent.bpffs");
    assert_eq!(config.cgroup, Path::new("/sys/fs/cgroup"), "agent.cgroup");
}

#[test]
fn daemonset_is_least_privilege_and_matches_the_config() {
    let docs = documents();
    let (text, config) = agent_config(&docs);
    let daemonset = resource(&docs, "DaemonSet", "sockshift");
    assert_eq!(str_at(&daemonset, "metadata.namespace"), "sockshift");
    let pod = at(&daemonset, "spec.template.spec");

    assert_eq!(
        at(pod, "hostNetwork").as_bool(),
        Some(true),
        "hostNetwork must be true: the agent reads the host netns cookie and serves on node loopback"
    );
    assert_ne!(pod.get("hostPID").and_then(Value::as_bool), Some(true), "hostPID must not be true");
    assert_eq!(at(&daemonset, "spec.updateStrategy.type").as_str(), Some("RollingUpdate"), "updateStrategy.type");

    let containers = at(pod, "containers").as_sequence().expect("containers must be a list");
    assert_eq!(containers.len(), 1, "the DaemonSet runs exactly one container");
    let container = &containers[0];
    assert_eq!(str_at(container, "image"), "sockshift:latest");

    // Least privilege.
    let security = at(container, "securityContext");
    assert_ne!(security.get("privileged").and_then(Value::as_bool), Some(true), "the container must not be privileged");
    assert_eq!(at(security, "allowPrivilegeEscalation").as_bool(), Some(false), "allowPrivilegeEscalation");
    assert_eq!(at(security, "readOnlyRootFilesystem").as_bool(), Some(true), "readOnlyRootFilesystem");
    assert_eq!(strings_at(security, "capabilities.drop"), ["ALL"], "capabilities.drop must be exactly [ALL]");
    let mut added = strings_at(security, "capabilities.add");
    added.sort();
    assert_eq!(added, CAPABILITIES, "capabilities.add must be exactly {CAPABILITIES:?}");
    // The agent checks the same list at start (agent/src/caps.rs).
    let mut checked: Vec<&str> =
        agent::caps::REQUIRED.iter().map(|(capability, _)| capability.name.trim_start_matches("CAP_")).collect();
    checked.sort();
    assert_eq!(checked, CAPABILITIES, "agent::caps::REQUIRED and the manifest's capabilities.add differ");

    // The API server (not the schema) refuses Bidirectional propagation on a container that is
    // not privileged.
    let mounts = at(container, "volumeMounts").as_sequence().expect("volumeMounts must be a list");
    for mount in mounts {
        assert_ne!(
            mount.get("mountPropagation").and_then(Value::as_str),
            Some("Bidirectional"),
            "volumeMount {:?}: the API server allows Bidirectional mount propagation only to privileged containers",
            mount["name"].as_str().unwrap_or("?")
        );
    }

    // The command reads the ConfigMap's key where the ConfigMap is mounted.
    let command = strings_at(container, "command");
    let config_volume = at(pod, "volumes")
        .as_sequence()
        .expect("volumes must be a list")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some("sockshift-config"))
        .expect("a volume must hold ConfigMap sockshift-config");
    let config_volume = str_at(config_volume, "name");
    let config_mount = mounts
        .iter()
        .find(|m| m["name"].as_str() == Some(config_volume))
        .unwrap_or_else(|| panic!("volume {config_volume:?} (the ConfigMap) is not mounted"));
    let config_file = format!("{}/{CONFIG_KEY}", str_at(config_mount, "mountPath").trim_end_matches('/'));
    assert_eq!(command, ["sockshift", "agent", "--config", config_file.as_str()], "command");

    // The pin directory is on the node's bpffs, writable, so pins outlive the pod.
    let bpffs_mount = mounts
        .iter()
        .filter(|m| config.bpffs.starts_with(str_at(m, "mountPath")))
        .max_by_key(|m| str_at(m, "mountPath").len())
        .unwrap_or_else(|| panic!("no volume is mounted above agent.bpffs {}", config.bpffs.display()));
    let bpffs_volume = str_at(bpffs_mount, "name");
    let bpffs_host_path = at(pod, "volumes")
        .as_sequence()
        .expect("volumes must be a list")
        .iter()
        .find(|v| v["name"].as_str() == Some(bpffs_volume))
        .and_then(|v| v["hostPath"]["path"].as_str());
    assert_eq!(bpffs_host_path, Some("/sys/fs/bpf"), "agent.bpffs must be on the node's /sys/fs/bpf (a hostPath)");
    assert_ne!(bpffs_mount["readOnly"].as_bool(), Some(true), "the bpffs mount must be writable");

    // Both probes ask the API the ConfigMap configures for /healthz.
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = at(container, &format!("{probe}.httpGet"));
        assert_eq!(str_at(get, "path"), "/healthz", "{probe}.httpGet.path");
        assert_eq!(
            at(get, "port").as_u64(),
            Some(u64::from(config.api.port())),
            "{probe}.httpGet.port must be the port of agent.api {}",
            config.api
        );
        assert_eq!(
            str_at(get, "host"),
            config.api.ip().to_string(),
            "{probe}.httpGet.host must be the address of agent.api {} (the node's loopback)",
            config.api
        );
        if let Some(scheme) = get.get("scheme") {
            assert_eq!(scheme.as_str(), Some("HTTP"), "{probe}.httpGet.scheme");
        }
    }

    // The API asks for tokens, and every token file comes from a Secret volume mounted 0400.
    assert!(config.tokens.is_some(), "the shipped config must set [agent.auth]");
    let token_files: Vec<&str> =
        text.lines().filter_map(|l| l.trim().strip_prefix("token_file = ")).map(|p| p.trim_matches('"')).collect();
    assert!(!token_files.is_empty(), "the tokens must come from files (a Secret), not inline");
    let mounts = at(container, "volumeMounts").as_sequence().unwrap();
    for file in token_files {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"].as_str().is_some_and(|p| Path::new(file).starts_with(p)))
            .unwrap_or_else(|| panic!("no volume is mounted above token_file {file}"));
        let volume = at(pod, "volumes")
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("volume {:?} is not declared", mount["name"]));
        assert!(volume["secret"]["secretName"].as_str().is_some(), "token_file {file} must come from a Secret");
        assert_eq!(
            volume["secret"]["defaultMode"].as_u64(),
            Some(0o400),
            "the token Secret's defaultMode must be 0400"
        );
    }
}

/// The verbs Kubernetes discovery needs on each resource, and nothing else.
const DISCOVERY_RULES: [(&str, &str); 2] = [("", "services"), ("discovery.k8s.io", "endpointslices")];
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

#[test]
fn rbac_is_exactly_read_access_to_services_and_endpointslices() {
    let docs = documents();
    // The agent's pod runs as the ServiceAccount and mounts its token (in-cluster credentials).
    let account = resource(&docs, "ServiceAccount", "sockshift");
    assert_eq!(str_at(&account, "metadata.namespace"), "sockshift");
    assert_ne!(account.get("automountServiceAccountToken").and_then(Value::as_bool), Some(false));
    let daemonset = resource(&docs, "DaemonSet", "sockshift");
    let pod = at(&daemonset, "spec.template.spec");
    assert_eq!(str_at(pod, "serviceAccountName"), "sockshift");
    assert_eq!(
        pod.get("automountServiceAccountToken").and_then(Value::as_bool),
        Some(true),
        "the pod must mount the ServiceAccount token: discovery reads the API server with it"
    );

    // Exactly one role: get/list/watch on core services and discovery.k8s.io endpointslices.
    let roles: Vec<&Value> =
        docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole"))).collect();
    assert_eq!(roles.len(), 1, "exactly one Role/ClusterRole: {roles:?}");
    let role = resource(&docs, "ClusterRole", "sockshift");
    assert!(role.get("aggregationRule").is_none(), "an aggregated role could gain rules at run time");
    let rules = at(&role, "rules").as_sequence().expect("rules must be a list");
    let mut granted = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let keys: Vec<&str> =
            rule.as_mapping().expect("a rule is a mapping").keys().filter_map(Value::as_str).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, ["apiGroups", "resources", "verbs"], "rules[{index}]: no resourceNames or nonResourceURLs");
        let groups = strings_at(rule, "apiGroups");
        let resources = strings_at(rule, "resources");
        let mut verbs = strings_at(rule, "verbs");
        verbs.sort();
        assert_eq!(verbs, READ_VERBS, "rules[{index}].verbs must be exactly get, list, watch");
        for group in &groups {
            for resource in &resources {
                granted.push((group.clone(), resource.clone()));
            }
        }
    }
    granted.sort();
    let mut wanted: Vec<(String, String)> =
        DISCOVERY_RULES.iter().map(|(g, r)| (g.to_string(), r.to_string())).collect();
    wanted.sort();
    assert_eq!(granted, wanted, "the role grants exactly services (core) and endpointslices (discovery.k8s.io)");

    // Bound to the agent's ServiceAccount and nothing else.
    let bindings: Vec<&Value> =
        docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding"))).collect();
    assert_eq!(bindings.len(), 1, "exactly one binding: {bindings:?}");
    let binding = resource(&docs, "ClusterRoleBinding", "sockshift");
    assert_eq!(str_at(&binding, "roleRef.apiGroup"), "rbac.authorization.k8s.io");
    assert_eq!(str_at(&binding, "roleRef.kind"), "ClusterRole");
    assert_eq!(str_at(&binding, "roleRef.name"), "sockshift");
    let subjects = at(&binding, "subjects").as_sequence().expect("subjects must be a list");
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(str_at(&subjects[0], "kind"), "ServiceAccount");
    assert_eq!(str_at(&subjects[0], "name"), "sockshift");
    assert_eq!(str_at(&subjects[0], "namespace"), "sockshift");
}
