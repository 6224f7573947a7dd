//! The OpenAPI document served at `GET /v1/openapi.json` is generated from the API's handlers and
//! types (utoipa), so its schemas cannot drift from the code. What is left to check: the document
//! is valid OpenAPI (openapi-spec-validator, installed by `cargo xtask test`; missing, the test
//! fails), a real agent serves exactly it, its router answers every documented operation and
//! refuses undocumented methods, and every operation describes its errors.

use std::{collections::BTreeSet, process::Command};

use e2e::{require_root, Agent, Cgroup};
use serde_json::Value;

/// The operations the README promises (the generated document must keep them all).
const REQUIRED_OPERATIONS: [(&str, &str); 17] = [
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/services"),
    ("get", "/v1/services/{name}"),
    ("put", "/v1/services/{name}"),
    ("delete", "/v1/services/{name}"),
    ("put", "/v1/services/{name}/canary"),
    ("post", "/v1/services/{name}/rollback"),
    ("post", "/v1/services/{name}/promote"),
    ("get", "/v1/services/{name}/rollout"),
    ("post", "/v1/services/{name}/rollout"),
    ("post", "/v1/services/{name}/rollout/{action}"),
    ("get", "/v1/datapath"),
    ("get", "/v1/datapath/log"),
    ("get", "/v1/audit"),
    ("get", "/v1/cluster"),
];

/// Routes anyone may call, without a token.
const PUBLIC: [&str; 2] = ["/healthz", "/v1/openapi.json"];

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn document() -> Value {
    serde_json::to_value(agent::api::openapi()).expect("the document serializes")
}

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            if METHODS.contains(&method.as_str()) {
                out.push((method.clone(), path.clone(), operation.clone()));
            }
        }
    }
    out
}

fn spec_validator(path: &std::path::Path) -> (bool, String) {
    let output = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(path)
        .output()
        .expect("python3 runs (cargo xtask test installs openapi-spec-validator)");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn openapi_spec_validator_accepts_the_document() {
    let file = std::env::temp_dir().join(format!("sockshift-openapi-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_string_pretty(&document()).unwrap()).unwrap();
    let (ok, output) = spec_validator(&file);
    assert!(ok && output.contains("OK"), "openapi-spec-validator rejects the generated document:\n{output}");

    // And it really checks: a path parameter left undeclared is refused.
    let mut broken = document();
    for operation in broken["paths"]["/v1/services/{name}"].as_object_mut().unwrap().values_mut() {
        operation.as_object_mut().unwrap().remove("parameters");
    }
    std::fs::write(&file, serde_json::to_string_pretty(&broken).unwrap()).unwrap();
    let (ok, output) = spec_validator(&file);
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "openapi-spec-validator accepts a document with an undeclared path parameter:\n{output}");
}

#[test]
fn every_operation_describes_its_errors_and_roles() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc).into_iter().map(|(m, p, _)| (m, p)).collect();
    for (method, path) in REQUIRED_OPERATIONS {
        assert!(documented.contains(&(method.to_string(), path.to_string())), "{method} {path} is not documented");
    }
    let error_ref = "#/components/schemas/Error";
    for (method, path, operation) in operations(&doc) {
        let what = format!("{method} {path}");
        let responses = operation["responses"].as_object().unwrap_or_else(|| panic!("{what}: no responses"));
        let errors: Vec<(&String, &Value)> = responses.iter().filter(|(status, _)| !status.starts_with('2')).collect();
        if path != "/healthz" && path != "/v1/openapi.json" {
            assert!(!errors.is_empty(), "{what}: no error response described");
        }
        for (status, response) in errors {
            let schema = &response["content"]["application/json"]["schema"]["$ref"];
            let health = path == "/healthz" && status == "503";
            assert!(health || schema == error_ref, "{what} {status}: must answer the Error schema, got {response}");
            assert!(response["description"].as_str().is_some_and(|d| !d.is_empty()), "{what} {status}: no description");
        }
        if PUBLIC.contains(&path.as_str()) {
            assert!(operation.get("security").is_none(), "{what} needs no token");
            continue;
        }
        assert!(operation["security"][0].get("bearer").is_some(), "{what}: must name the bearer scheme");
        assert!(responses.contains_key("401") && responses.contains_key("403"), "{what}: must document 401 and 403");
        let description = operation["description"].as_str().or(operation["summary"].as_str()).unwrap_or("");
        assert!(
            ["`viewer`", "`operator`", "`release`"].iter().any(|role| description.contains(role)),
            "{what}: the description must name the role it needs: {description:?}"
        );
    }
    // The error codes are the enum's, each one a documented string.
    let codes = doc["components"]["schemas"]["ErrorCode"]["enum"].as_array().expect("ErrorCode enum");
    for code in ["malformed_json", "unknown_field", "unauthorized", "service_not_found", "state_not_saved"] {
        assert!(codes.contains(&Value::from(code)), "ErrorCode lacks {code}: {codes:?}");
    }
    let plan = &doc["components"]["schemas"]["Plan"];
    assert_eq!(plan["additionalProperties"], Value::Bool(false), "Plan refuses unknown fields: {plan}");
}

/// A real agent serves the generated document, answers every documented operation (with
/// anything but "no such route") and refuses every other method on those paths with 405.
/// The status of a GET whose answer streams: the status line is read, then the connection
/// dropped.
fn streamed_status(agent: &Agent, path: &str) -> u16 {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(agent.api).expect("connect to the API");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let auth = agent.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n", agent.api).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).expect("the status line");
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn the_router_serves_exactly_the_documented_operations() {
    require_root();
    let cgroup = Cgroup::new();
    let agent = Agent::start(&cgroup, "");
    let (status, served) = agent.call("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    assert_eq!(served, document(), "the served document is not the generated one");

    let doc = document();
    let operations = operations(&doc);
    let documented: BTreeSet<(String, String)> = operations.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    for path in documented.iter().map(|(_, p)| p).collect::<BTreeSet<_>>() {
        let concrete = path.replace("{name}", "nope").replace("{action}", "pause");
        for method in METHODS {
            if method == "get" && path == "/v1/datapath/log" {
                // It streams until the client goes: only the answer's status line is read.
                assert_eq!(streamed_status(&agent, &concrete), 200, "GET {concrete}");
                continue;
            }
            let (status, body) = agent.call_raw(&method.to_uppercase(), &concrete, b"");
            if documented.contains(&(method.to_string(), path.clone())) {
                assert!(
                    status != 405 && body["code"] != "not_found",
                    "{method} {concrete} is documented but not routed: {status} {body}"
                );
            } else {
                assert_eq!(status, 405, "{method} {concrete} is routed but not documented: {body}");
                assert_eq!(body["code"], "method_not_allowed", "{body}");
            }
        }
    }
    let (status, body) = agent.call("GET", "/v1/nothing-here", None);
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
}
