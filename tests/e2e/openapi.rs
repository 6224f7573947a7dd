//! agent/openapi.json, the OpenAPI document served at GET /v1/openapi.json, stays true to the
//! code: it documents exactly the routes and methods of the router in agent/src/api.rs, each with
//! the role its handler authorizes; its `Error` schema lists exactly the codes the API emits; its
//! request schemas have the fields of the structs the server deserializes; its response schemas
//! have the keys the handlers build; and openapi-spec-validator accepts it.
//!
//! The sources are read with simple string processing, so a construct this test does not know
//! (a nested router, a computed error code) fails it with a message saying so, rather than being
//! silently skipped. Needs neither root nor the kernel datapath; needs python3 with
//! openapi-spec-validator (`cargo xtask test` installs it) and fails, rather than skips, without it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// Every route and method the API must have (the router may not lose one unnoticed either).
const REQUIRED_OPERATIONS: [(&str, &str); 12] = [
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/services"),
    ("GET", "/v1/services/{name}"),
    ("PUT", "/v1/services/{name}"),
    ("DELETE", "/v1/services/{name}"),
    ("PUT", "/v1/services/{name}/canary"),
    ("POST", "/v1/services/{name}/rollback"),
    ("POST", "/v1/services/{name}/promote"),
    ("GET", "/v1/datapath"),
    ("GET", "/v1/audit"),
];

/// Method names of OpenAPI path items (and of axum's method routers).
const HTTP_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

const API_RS: &str = "agent/src/api.rs";
const CONFIG_RS: &str = "agent/src/config.rs";
const AUDIT_RS: &str = "agent/src/audit.rs";
const DOCUMENT: &str = "agent/openapi.json";

// ---------------------------------------------------------------------------------------------
// Files

fn repo_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is tests/; the agent is its sibling.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

fn document() -> Value {
    serde_json::from_str(&read(DOCUMENT)).unwrap_or_else(|err| panic!("{DOCUMENT} is not valid JSON: {err}"))
}

/// `value` at a JSON pointer without its leading `/` (`~1` is a `/` in a key); panics naming the
/// path if it is missing.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    value.pointer(&format!("/{path}")).unwrap_or_else(|| panic!("{DOCUMENT}: {path} is missing"))
}

/// Follows a `$ref` to `#/components/...` (repeatedly); anything else is returned as is.
fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{DOCUMENT}: only local $refs are expected, found {reference:?}"));
        value = doc.pointer(pointer).unwrap_or_else(|| panic!("{DOCUMENT}: dangling $ref {reference:?}"));
    }
    value
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    at(doc, &format!("components/schemas/{name}"))
}

fn string_set(value: &Value, what: &str) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{DOCUMENT}: {what} must be an array, got {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("{DOCUMENT}: {what} holds a non-string {v}")).to_owned())
        .collect()
}

fn property_names(schema: &Value) -> BTreeSet<String> {
    schema.get("properties").and_then(Value::as_object).map(|p| p.keys().cloned().collect()).unwrap_or_default()
}

fn required_names(schema: &Value) -> BTreeSet<String> {
    schema.get("required").map(|r| string_set(r, "required")).unwrap_or_default()
}

/// Panics listing what is only on either side, when the sets differ.
fn assert_same(what: &str, code_side: &BTreeSet<String>, doc_side: &BTreeSet<String>) {
    let missing: Vec<&String> = code_side.difference(doc_side).collect();
    let extra: Vec<&String> = doc_side.difference(code_side).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {DOCUMENT} does not match the code.\n  in the code but not documented: {missing:?}\n  \
         documented but not in the code: {extra:?}"
    );
}

/// The version of the agent crate, from agent/Cargo.toml (or the workspace's, if it inherits it).
fn agent_version() -> String {
    let manifest = read("agent/Cargo.toml");
    if manifest.lines().any(|l| l.replace(' ', "") == "version.workspace=true") {
        toml_string(&read("Cargo.toml"), "workspace.package", "version")
    } else {
        toml_string(&manifest, "package", "version")
    }
}

/// `key = "value"` in `[section]` of a simple TOML file.
fn toml_string(text: &str, section: &str, key: &str) -> String {
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_string();
        } else if current == section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return v.trim().trim_matches('"').to_string();
                }
            }
        }
    }
    panic!("no {key} in [{section}]")
}

// ---------------------------------------------------------------------------------------------
// A minimal reader of Rust source: comments removed, literals and bracket nesting respected.

struct Source {
    name: &'static str,
    chars: Vec<char>,
}

/// If a string, raw string, byte string or char literal starts at `i`, the index just after it.
fn literal_end(s: &[char], i: usize) -> Option<usize> {
    let get = |k: usize| s.get(k).copied().unwrap_or('\0');
    let in_ident = i > 0 && (s[i - 1].is_alphanumeric() || s[i - 1] == '_');
    if in_ident {
        return None;
    }
    let mut j = i;
    if s[j] == 'b' && matches!(get(j + 1), '"' | '\'' | 'r') {
        j += 1;
    }
    match s[j] {
        'r' => {
            let mut k = j + 1;
            while get(k) == '#' {
                k += 1;
            }
            let hashes = k - j - 1;
            if get(k) != '"' {
                return None;
            }
            let mut m = k + 1;
            while m < s.len() {
                if s[m] == '"' && (1..=hashes).all(|h| get(m + h) == '#') {
                    return Some(m + 1 + hashes);
                }
                m += 1;
            }
            Some(s.len())
        }
        '"' => {
            let mut m = j + 1;
            while m < s.len() {
                match s[m] {
                    '\\' => m += 2,
                    '"' => return Some(m + 1),
                    _ => m += 1,
                }
            }
            Some(s.len())
        }
        '\'' if get(j + 1) == '\\' => (j + 3..s.len()).find(|&m| s[m] == '\'').map(|m| m + 1),
        '\'' if get(j + 2) == '\'' => Some(j + 3),
        _ => None, // a lifetime, or no literal
    }
}

impl Source {
    fn load(relative: &'static str) -> Self {
        let raw: Vec<char> = read(relative).chars().collect();
        let mut chars = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            if let Some(end) = literal_end(&raw, i) {
                chars.extend_from_slice(&raw[i..end]);
                i = end;
            } else if raw[i] == '/' && raw.get(i + 1) == Some(&'/') {
                while i < raw.len() && raw[i] != '\n' {
                    i += 1;
                }
            } else if raw[i] == '/' && raw.get(i + 1) == Some(&'*') {
                let end = (i + 2..raw.len().saturating_sub(1)).find(|&k| raw[k] == '*' && raw[k + 1] == '/');
                i = end.map_or(raw.len(), |k| k + 2);
                chars.push(' ');
            } else {
                chars.push(raw[i]);
                i += 1;
            }
        }
        Self { name: relative, chars }
    }

    fn text(&self, from: usize, to: usize) -> String {
        self.chars[from..to].iter().collect()
    }

    /// Char indices where `pattern` starts (outside comments, which are gone).
    fn find_all(&self, pattern: &str) -> Vec<usize> {
        let pattern: Vec<char> = pattern.chars().collect();
        (0..self.chars.len().saturating_sub(pattern.len() - 1))
            .filter(|&i| self.chars[i..i + pattern.len()] == pattern[..])
            .collect()
    }

    fn find_from(&self, from: usize, pattern: &str) -> Option<usize> {
        let pattern: Vec<char> = pattern.chars().collect();
        (from..self.chars.len().saturating_sub(pattern.len() - 1))
            .find(|&i| self.chars[i..i + pattern.len()] == pattern[..])
    }

    /// Index of the bracket closing the one at `open`.
    fn close(&self, open: usize) -> usize {
        close_of(&self.chars, open).unwrap_or_else(|| panic!("{}: unbalanced brackets", self.name))
    }

    /// The top-level, comma-separated items inside the bracket at `open`.
    fn items(&self, open: usize) -> Vec<String> {
        split_top_level(&self.chars[open + 1..self.close(open)])
    }

    /// The body (between the braces) of `fn name`.
    fn fn_body(&self, name: &str) -> (usize, usize) {
        let starts: Vec<usize> = self
            .find_all(&format!("fn {name}"))
            .into_iter()
            .filter(|&i| matches!(self.chars.get(i + 3 + name.len()), Some('(' | '<')))
            .collect();
        assert_eq!(starts.len(), 1, "{}: expected exactly one `fn {name}`", self.name);
        let params = self.find_from(starts[0], "(").expect("parameter list");
        let open =
            self.find_from(self.close(params), "{").unwrap_or_else(|| panic!("{}: fn {name} has no body", self.name));
        (open, self.close(open))
    }

    /// The lines of the body of `pub struct name { .. }` or `pub enum name { .. }`, and the
    /// attributes written before it.
    fn item(&self, keyword: &str, name: &str) -> (String, Vec<String>) {
        let head = format!("pub {keyword} {name} {{");
        let starts = self.find_all(&head);
        assert_eq!(starts.len(), 1, "{}: expected exactly one `{head}`", self.name);
        let start = starts[0];
        // The attributes: back to the end of the item before.
        let before = self.chars[..start].iter().rposition(|c| matches!(c, '}' | ';')).map_or(0, |i| i + 1);
        let open = start + head.chars().count() - 1;
        let body = self.text(open + 1, self.close(open));
        (self.text(before, start), body.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
    }
}

fn close_of(s: &[char], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < s.len() {
        if let Some(end) = literal_end(s, i) {
            i = end;
            continue;
        }
        match s[i] {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn split_top_level(s: &[char]) -> Vec<String> {
    let mut items = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < s.len() {
        if let Some(end) = literal_end(s, i) {
            i = end;
            continue;
        }
        match s[i] {
            '(' | '[' | '{' => {
                i = close_of(s, i).expect("unbalanced brackets") + 1;
                continue;
            }
            ',' => {
                items.push(s[start..i].iter().collect::<String>());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    items.push(s[start..].iter().collect::<String>());
    items.into_iter().map(|item| item.trim().to_string()).filter(|item| !item.is_empty()).collect()
}

/// The contents of a plain string literal (no escapes expected in paths and codes).
fn string_literal(text: &str) -> Option<String> {
    let inner = text.trim().strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains(['"', '\\'])).then(|| inner.to_string())
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// The routes, in the code and in the document

/// (METHOD, path) → handler, from the `.route("PATH", get(a).put(b))` calls of api.rs.
fn source_routes() -> BTreeMap<(String, String), String> {
    let src = Source::load(API_RS);
    for unsupported in [".nest(", ".nest_service(", ".route_service(", ".merge("] {
        assert!(
            src.find_all(unsupported).is_empty(),
            "{API_RS} uses `{unsupported}..)`: this test only reads `.route(..)` calls; teach it that one"
        );
    }
    let mut routes = BTreeMap::new();
    let calls = src.find_all(".route(");
    assert!(!calls.is_empty(), "no `.route(..)` calls found in {API_RS}");
    for call in calls {
        let items = src.items(call + ".route".len());
        let [path, method_router] = &items[..] else {
            panic!("{API_RS}: a `.route(..)` call does not have 2 arguments: {items:?}")
        };
        let path =
            string_literal(path).unwrap_or_else(|| panic!("{API_RS}: route path {path} is not a string literal"));
        for (method, handler) in method_chain(method_router) {
            let method = method.rsplit("::").next().unwrap_or(&method).to_string();
            assert!(
                HTTP_METHODS.contains(&method.as_str()),
                "{API_RS}: route {path}: cannot tell the HTTP method of `{method}(..)`; teach this test"
            );
            let key = (method.to_uppercase(), path.clone());
            assert!(routes.insert(key, handler).is_none(), "{API_RS}: {method} {path} is routed twice");
        }
    }
    routes
}

/// `get(a).put(b)` → [("get", "a"), ("put", "b")].
fn method_chain(expr: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut calls = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        assert!(
            !name.is_empty() && chars.get(i) == Some(&'('),
            "{API_RS}: cannot read the method router `{expr}`: expected calls like `get(handler).put(handler)`"
        );
        let close = close_of(&chars, i).expect("unbalanced brackets");
        calls.push((name, chars[i + 1..close].iter().collect::<String>().trim().to_string()));
        i = close + 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        match chars.get(i) {
            None => return calls,
            Some('.') => i += 1,
            Some(other) => {
                panic!("{API_RS}: cannot read the method router `{expr}` (at {other:?})")
            }
        }
    }
}

/// (METHOD, path) → operation, from the document.
fn document_operations(doc: &Value) -> BTreeMap<(String, String), &Value> {
    let paths = at(doc, "paths").as_object().unwrap_or_else(|| panic!("{DOCUMENT}: paths is not an object"));
    let mut operations = BTreeMap::new();
    for (path, item) in paths {
        for (key, operation) in item.as_object().unwrap_or_else(|| panic!("{DOCUMENT}: paths.{path} is not an object"))
        {
            if HTTP_METHODS.contains(&key.as_str()) {
                operations.insert((key.to_uppercase(), path.clone()), operation);
            }
        }
    }
    operations
}

/// The role a handler passes to `authorize`, or "none". A role known only at run time (a
/// variable, e.g. the approver role a rollout plan names) is a further check on top of the
/// handler's fixed `Role::..` one, which is the role the document names; a handler with only
/// run-time roles fails this test.
fn handler_role(src: &Source, handler: &str) -> String {
    let (open, close) = src.fn_body(handler);
    let mut run_time = Vec::new();
    let roles: BTreeSet<String> = src
        .find_all("authorize(")
        .into_iter()
        .filter(|&i| i > open && i < close && !is_identifier(&src.text(i - 1, i)))
        .filter_map(|i| {
            let items = src.items(i + "authorize".len());
            let role = items.get(2).map_or("", String::as_str);
            if is_identifier(role) {
                run_time.push(role.to_string());
                return None;
            }
            let variant = role
                .strip_prefix("Role::")
                .unwrap_or_else(|| panic!("{API_RS}: fn {handler}: cannot tell the role of `authorize(.., {role})`"));
            Some(variant.to_lowercase())
        })
        .collect();
    match roles.len() {
        0 if run_time.is_empty() => "none".into(),
        0 => panic!(
            "{API_RS}: fn {handler} authorizes only roles known at run time {run_time:?}, \
             no fixed `Role::..` to document"
        ),
        1 => roles.into_iter().next().unwrap(),
        _ => panic!("{API_RS}: fn {handler} authorizes several roles {roles:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Error codes and Rust types

/// Every error code api.rs emits: string literals given as the code of `ApiError::new`,
/// `ApiError::invalid` and `ApiError { code: .. }`, and those a `let code = ..;` picks from.
fn emitted_codes() -> BTreeSet<String> {
    let src = Source::load(API_RS);
    let mut codes = BTreeSet::new();
    let mut take = |arg: &str, site: &str| match string_literal(arg) {
        Some(code) => {
            codes.insert(code);
        }
        None if arg == "code" => {} // a `let code = ..;`, read below
        None => panic!("{API_RS}: cannot tell the code `{arg}` of `{site}`; use a string literal"),
    };
    for (call, index) in [("ApiError::new(", 1), ("ApiError::invalid(", 0)] {
        for i in src.find_all(call) {
            let items = src.items(i + call.len() - 1);
            let arg = items.get(index).unwrap_or_else(|| panic!("{API_RS}: {call}..) with too few arguments"));
            take(arg, call);
        }
    }
    for i in src.find_all("ApiError {") {
        // Not a struct literal: the definition, an impl, or a return type before a body.
        let before = src.text(i.saturating_sub(12), i);
        if ["struct", "for", "impl", "->"].iter().any(|word| before.trim_end().ends_with(word)) {
            continue;
        }
        let fields = src.items(i + "ApiError ".len());
        match fields.iter().find_map(|f| f.strip_prefix("code:")) {
            Some(arg) => take(arg.trim(), "ApiError { code: .. }"),
            None => panic!("{API_RS}: an `ApiError {{ .. }}` literal without `code: \"..\"`: {fields:?}"),
        }
    }
    // `let code = if .. { "a" } else { "b" };`: the literals that are a whole block's value.
    for i in src.find_all("let code =") {
        let end = src.find_from(i, ";").expect("`let code = ..;` ends");
        let chars = &src.chars[i..end];
        let mut k = 0;
        while k < chars.len() {
            let Some(next) = literal_end(chars, k) else {
                k += 1;
                continue;
            };
            let before = chars[..k].iter().rev().find(|c| !c.is_whitespace());
            let after = chars[next..].iter().find(|c| !c.is_whitespace());
            if before == Some(&'{') && after == Some(&'}') {
                let literal: String = chars[k..next].iter().collect();
                codes.insert(string_literal(&literal).unwrap_or_else(|| panic!("{API_RS}: code {literal}")));
            }
            k = next;
        }
    }
    assert!(!codes.is_empty(), "no error codes found in {API_RS}");
    for code in &codes {
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{API_RS}: error code {code:?} is not of the form [a-z_]+"
        );
    }
    codes
}

struct RustStruct {
    deny_unknown_fields: bool,
    /// Serialized name → has a serde default.
    fields: BTreeMap<String, bool>,
}

/// The attribute arguments of every `#[serde(..)]` in `text`.
fn serde_args(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = "#[serde(".chars().collect();
    (0..chars.len().saturating_sub(pattern.len() - 1))
        .filter(|&i| chars[i..i + pattern.len()] == pattern[..])
        .flat_map(|i| {
            let open = i + pattern.len() - 1;
            split_top_level(&chars[open + 1..close_of(&chars, open).expect("balanced attribute")])
        })
        .collect()
}

fn serde_value(args: &[String], key: &str) -> Option<String> {
    args.iter().find_map(|arg| {
        let (k, v) = arg.split_once('=')?;
        (k.trim() == key).then(|| string_literal(v).unwrap_or_else(|| panic!("serde {key} = {v}")))
    })
}

fn rust_struct(src: &Source, name: &str) -> RustStruct {
    let (attributes, lines) = src.item("struct", name);
    let struct_args = serde_args(&attributes);
    let all_default = struct_args.iter().any(|a| a == "default");
    let mut fields = BTreeMap::new();
    let mut pending = String::new();
    for line in lines {
        if line.starts_with("#[") {
            pending.push_str(&line);
            continue;
        }
        let field = line
            .strip_prefix("pub ")
            .and_then(|l| l.split_once(':'))
            .map(|(f, _)| f.trim().to_string())
            .unwrap_or_else(|| panic!("{}: struct {name}: cannot read the field line {line:?}", src.name));
        let args = serde_args(&pending);
        pending.clear();
        assert!(
            !args.iter().any(|a| a == "flatten" || a.starts_with("alias")),
            "{}: struct {name}.{field}: flatten/alias are not understood by this test",
            src.name
        );
        if args.iter().any(|a| a == "skip" || a == "skip_deserializing") {
            continue;
        }
        let serialized = serde_value(&args, "rename").unwrap_or(field);
        let defaulted = all_default
            || args.iter().any(|a| a == "default" || a.starts_with("default ") || a.starts_with("default="));
        fields.insert(serialized, defaulted);
    }
    RustStruct { deny_unknown_fields: struct_args.iter().any(|a| a == "deny_unknown_fields"), fields }
}

/// The serialized names of a fieldless (or newtype) enum's variants.
fn rust_enum(src: &Source, name: &str) -> BTreeSet<String> {
    let (attributes, lines) = src.item("enum", name);
    let rename_all = serde_value(&serde_args(&attributes), "rename_all");
    lines
        .iter()
        .filter(|l| !l.starts_with("#["))
        .map(|l| {
            let variant = l.trim_end_matches(',').split('(').next().unwrap().trim();
            assert!(is_identifier(variant), "{}: enum {name}: cannot read the variant line {l:?}", src.name);
            match rename_all.as_deref() {
                None => variant.to_string(),
                Some("lowercase") => variant.to_lowercase(),
                Some(other) => {
                    panic!("{}: enum {name}: rename_all = {other:?} is not understood by this test", src.name)
                }
            }
        })
        .collect()
}

/// The keys of a `json!({ .. })` object, with those of nested object literals (`None`: the value
/// is not an object literal).
struct Keys(BTreeMap<String, Option<Keys>>);

impl Keys {
    fn names(&self) -> BTreeSet<String> {
        self.0.keys().cloned().collect()
    }
}

/// The keys of the first `json!({ .. })` object in `fn name`.
fn json_keys(src: &Source, name: &str) -> Keys {
    let (open, close) = src.fn_body(name);
    let at = src
        .find_all("json!({")
        .into_iter()
        .find(|&i| i > open && i < close)
        .unwrap_or_else(|| panic!("{}: fn {name} builds no `json!({{ .. }})`", src.name));
    object_keys(&src.chars[at + "json!(".len()..], &format!("{}: fn {name}", src.name))
}

fn object_keys(chars: &[char], site: &str) -> Keys {
    let close = close_of(chars, 0).expect("balanced json!");
    Keys(
        split_top_level(&chars[1..close])
            .into_iter()
            .map(|entry| {
                let entry_chars: Vec<char> = entry.chars().collect();
                let key_end = literal_end(&entry_chars, 0).unwrap_or_else(|| panic!("{site}: json! key of {entry:?}"));
                let key = string_literal(&entry_chars[..key_end].iter().collect::<String>())
                    .unwrap_or_else(|| panic!("{site}: json! key of {entry:?} is not a plain string"));
                let value = entry_chars[key_end..].iter().collect::<String>();
                let value =
                    value.trim().strip_prefix(':').unwrap_or_else(|| panic!("{site}: json! entry {entry:?}")).trim();
                let nested = value.starts_with('{').then(|| object_keys(&value.chars().collect::<Vec<_>>(), site));
                (key, nested)
            })
            .collect(),
    )
}

/// The schema's properties are exactly the keys the code builds, all required (the code always
/// writes them), recursively where the code builds a nested object literal.
fn assert_schema_has_keys(doc: &Value, schema: &Value, keys: &Keys, what: &str) {
    let schema = resolve(doc, schema);
    let code_keys = keys.names();
    assert_same(&format!("properties of {what}"), &code_keys, &property_names(schema));
    assert_same(
        &format!("required properties of {what} (the code always writes them)"),
        &code_keys,
        &required_names(schema),
    );
    for (key, nested) in &keys.0 {
        if let Some(nested) = nested {
            let property = &schema["properties"][key];
            assert_schema_has_keys(doc, property, nested, &format!("{what}.{key}"));
        }
    }
}

/// openapi-spec-validator's verdict on a file, and its output.
fn spec_validator(file: &Path) -> (bool, String) {
    let mut command = Command::new("python3");
    command.args(["-m", "openapi_spec_validator"]).arg(file);
    let out = command.output().unwrap_or_else(|err| {
        panic!(
            "cannot run python3 ({err}): openapi-spec-validator needs it; \
             `cargo xtask test` installs the tools"
        )
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if text.contains("No module named openapi_spec_validator") {
        panic!(
            "the Python package openapi-spec-validator is not installed: `cargo xtask test` installs it \
             (or `python3 -m pip install openapi-spec-validator`)\n{text}"
        );
    }
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn document_is_openapi_3_with_every_operation() {
    let doc = document();
    let version = at(&doc, "openapi").as_str().unwrap_or_else(|| panic!("{DOCUMENT}: `openapi` is not a string"));
    assert!(version.starts_with("3."), "{DOCUMENT}: openapi is {version:?}, expected 3.x");
    assert_eq!(
        at(&doc, "info/version").as_str(),
        Some(agent_version().as_str()),
        "{DOCUMENT}: info.version must be the agent crate's version"
    );
    let operations = document_operations(&doc);
    for (method, path) in REQUIRED_OPERATIONS {
        assert!(
            operations.contains_key(&(method.to_string(), path.to_string())),
            "{DOCUMENT} does not document {method} {path}"
        );
    }
}

#[test]
fn documented_operations_are_exactly_the_routes_of_the_router() {
    let routes = source_routes();
    for (method, path) in REQUIRED_OPERATIONS {
        assert!(
            routes.contains_key(&(method.to_string(), path.to_string())),
            "the router in {API_RS} has no {method} {path}"
        );
    }
    let show =
        |keys: Vec<&(String, String)>| keys.into_iter().map(|(m, p)| format!("{m} {p}")).collect::<BTreeSet<_>>();
    assert_same(
        "routes (method, path)",
        &show(routes.keys().collect()),
        &show(document_operations(&document()).keys().collect()),
    );
}

#[test]
fn each_operation_names_the_role_its_handler_authorizes() {
    let doc = document();
    let operations = document_operations(&doc);
    let src = Source::load(API_RS);
    let roles = rust_enum(&Source::load(CONFIG_RS), "Role");
    for ((method, path), handler) in source_routes() {
        // An undocumented route: the routes test says so.
        let Some(operation) = operations.get(&(method.clone(), path.clone())) else {
            continue;
        };
        assert!(is_identifier(&handler), "{API_RS}: {method} {path}: handler `{handler}` is not a plain fn name");
        let role = handler_role(&src, &handler);
        let what = format!("{DOCUMENT}: {method} {path} (fn {handler})");
        assert!(role == "none" || roles.contains(&role), "{what}: role {role:?} is not one of {roles:?}");
        assert_eq!(
            operation.get("x-required-role").and_then(Value::as_str),
            Some(role.as_str()),
            "{what}: x-required-role must be the role the handler authorizes (\"none\" without authorize)"
        );
        let description = operation.get("description").and_then(Value::as_str).unwrap_or_default();
        let responses =
            operation.get("responses").and_then(Value::as_object).unwrap_or_else(|| panic!("{what}: no responses"));
        if role == "none" {
            assert_eq!(
                operation.get("security"),
                Some(&serde_json::json!([])),
                "{what}: needs no token: `security: []`"
            );
            assert!(description.contains("No token needed"), "{what}: the description must say no token is needed");
            assert!(!responses.contains_key("401") && !responses.contains_key("403"), "{what}: never answers 401/403");
        } else {
            assert!(
                operation.get("security").is_none_or(|s| s != &serde_json::json!([])),
                "{what}: must not waive security"
            );
            assert!(description.contains(&format!("`{role}`")), "{what}: the description must name the role `{role}`");
            assert!(
                responses.contains_key("401") && responses.contains_key("403"),
                "{what}: must document 401 and 403"
            );
        }
    }
}

#[test]
fn error_schema_lists_exactly_the_codes_the_api_emits() {
    let doc = document();
    let error = schema(&doc, "Error");
    let documented = string_set(at(error, "properties/code/enum"), "Error.code.enum");
    assert_same("error codes (Error.code.enum)", &emitted_codes(), &documented);

    // The shape of the error body: `code` and `message` always, `field` when there is one.
    let src = Source::load(API_RS);
    let keys = json_keys(&src, "into_response");
    let (open, close) = src.fn_body("into_response");
    let mut all = keys.names();
    for i in src.find_all("body[\"").into_iter().filter(|&i| i > open && i < close) {
        let end = src.find_from(i + 6, "\"").expect("closing quote");
        all.insert(src.text(i + 6, end));
    }
    assert_same("properties of Error", &all, &property_names(error));
    assert_same("required properties of Error", &keys.names(), &required_names(error));

    // Every error answer of every operation is an Error, and its example's code is one of the enum.
    for ((method, path), operation) in document_operations(&doc) {
        let responses = operation.get("responses").and_then(Value::as_object);
        for (status, response) in responses.into_iter().flatten() {
            if status.starts_with('2') {
                continue;
            }
            let response = resolve(&doc, response);
            let media = at(response, "content/application~1json");
            assert_eq!(
                media.get("schema"),
                Some(&serde_json::json!({ "$ref": "#/components/schemas/Error" })),
                "{DOCUMENT}: {method} {path} {status} must answer the Error schema"
            );
            if let Some(code) = media.pointer("/example/code").and_then(Value::as_str) {
                assert!(
                    documented.contains(code),
                    "{DOCUMENT}: {method} {path} {status}: example code {code:?} not in the enum"
                );
            }
        }
    }
}

#[test]
fn request_schemas_have_the_fields_the_server_reads() {
    let doc = document();
    let config = Source::load(CONFIG_RS);
    // `name` may be left out of a PUT body: the path gives it.
    for (struct_name, schema_name, path_fills) in
        [("ServiceConfig", "ServiceConfig", &["name"][..]), ("CohortConfig", "Cohort", &[][..])]
    {
        let rust = rust_struct(&config, struct_name);
        let schema = schema(&doc, schema_name);
        let what = format!("{schema_name} (struct {struct_name} in {CONFIG_RS})");
        assert_same(&format!("properties of {what}"), &rust.fields.keys().cloned().collect(), &property_names(schema));
        let required: BTreeSet<String> = rust
            .fields
            .iter()
            .filter(|(f, defaulted)| !**defaulted && !path_fills.contains(&f.as_str()))
            .map(|(f, _)| f.clone())
            .collect();
        assert_same(&format!("required properties of {what}"), &required, &required_names(schema));
        let expected = rust.deny_unknown_fields.then_some(Value::Bool(false));
        assert_eq!(
            schema.get("additionalProperties").filter(|v| **v != Value::Bool(true)).cloned(),
            expected,
            "{DOCUMENT}: {what}: additionalProperties: false iff the struct denies unknown fields"
        );
    }
    // PUT /v1/services/{name} takes a ServiceConfig.
    let put = &document_operations(&doc)[&("PUT".to_string(), "/v1/services/{name}".to_string())];
    assert_eq!(
        put.pointer("/requestBody/content/application~1json/schema/$ref").and_then(Value::as_str),
        Some("#/components/schemas/ServiceConfig"),
        "{DOCUMENT}: PUT /v1/services/{{name}} must take a ServiceConfig"
    );

    let affinity = rust_enum(&config, "Affinity");
    assert_same("Affinity.enum", &affinity, &string_set(at(schema(&doc, "Affinity"), "enum"), "Affinity.enum"));
    let field_enum =
        string_set(at(schema(&doc, "ServiceConfig"), "properties/affinity/enum"), "ServiceConfig.affinity.enum");
    assert_same("ServiceConfig.affinity.enum", &affinity, &field_enum);
    let cohort_canary = string_set(at(schema(&doc, "Cohort"), "properties/canary/enum"), "Cohort.canary.enum");
    assert_same("Cohort.canary.enum (enum CohortCanary)", &rust_enum(&config, "CohortCanary"), &cohort_canary);
    let audit_roles = string_set(at(schema(&doc, "AuditEntry"), "properties/role/enum"), "AuditEntry.role.enum");
    assert_same("AuditEntry.role.enum (enum Role)", &rust_enum(&config, "Role"), &audit_roles);

    // PUT /v1/services/{name}/canary: the fields put_canary accepts.
    let api = Source::load(API_RS);
    let (open, close) = api.fn_body("put_canary");
    let call = api
        .find_all("reject_unknown_fields(")
        .into_iter()
        .find(|&i| i > open && i < close)
        .unwrap_or_else(|| panic!("{API_RS}: put_canary no longer calls reject_unknown_fields; update this test"));
    let items = api.items(call + "reject_unknown_fields".len());
    let list: Vec<char> = items[1].trim_start_matches('&').chars().collect();
    let known: BTreeSet<String> = split_top_level(&list[1..close_of(&list, 0).expect("field list")])
        .iter()
        .filter_map(|f| string_literal(f))
        .collect();
    let canary = schema(&doc, "CanaryUpdate");
    assert_same("properties of CanaryUpdate (put_canary's known fields)", &known, &property_names(canary));
    assert_eq!(canary.get("additionalProperties"), Some(&Value::Bool(false)), "CanaryUpdate: additionalProperties");
    let operations = document_operations(&doc);
    assert_eq!(
        operations[&("PUT".to_string(), "/v1/services/{name}/canary".to_string())]
            .pointer("/requestBody/content/application~1json/schema/$ref")
            .and_then(Value::as_str),
        Some("#/components/schemas/CanaryUpdate"),
        "{DOCUMENT}: PUT /v1/services/{{name}}/canary must take a CanaryUpdate"
    );
    // rollback and promote: no body, or `{}`.
    for path in ["/v1/services/{name}/rollback", "/v1/services/{name}/promote"] {
        let body = operations[&("POST".to_string(), path.to_string())]
            .get("requestBody")
            .unwrap_or_else(|| panic!("{DOCUMENT}: POST {path} must document its optional `{{}}` body"));
        assert_eq!(body.get("required").and_then(Value::as_bool), Some(false), "POST {path}: the body is optional");
        let media = resolve(&doc, at(body, "content/application~1json/schema"));
        assert_eq!(media.get("type").and_then(Value::as_str), Some("object"), "POST {path}: the body is an object");
        assert_eq!(media.get("additionalProperties"), Some(&Value::Bool(false)), "POST {path}: the body is `{{}}`");
        assert!(property_names(media).is_empty(), "POST {path}: the body is `{{}}`");
    }
}

#[test]
fn response_schemas_have_the_keys_the_handlers_build() {
    let doc = document();
    let api = Source::load(API_RS);
    for (function, schema_name) in [
        ("healthz", "Health"),
        ("list_services", "ServiceList"),
        ("service_state", "ServiceState"),
        ("render_side", "SideState"),
        ("datapath_status", "DatapathStatus"),
        ("audit_log", "AuditLog"),
    ] {
        assert_schema_has_keys(
            &doc,
            schema(&doc, schema_name),
            &json_keys(&api, function),
            &format!("{schema_name} (fn {function})"),
        );
    }
    let audit = Source::load(AUDIT_RS);
    assert_schema_has_keys(
        &doc,
        schema(&doc, "AuditEntry"),
        &json_keys(&audit, "record"),
        "AuditEntry (AuditLog::record)",
    );

    // The handlers answer these schemas.
    let operations = document_operations(&doc);
    let answers = |method: &str, path: &str, status: &str| {
        let response =
            resolve(&doc, at(operations[&(method.to_string(), path.to_string())], &format!("responses/{status}")));
        response.pointer("/content/application~1json/schema/$ref").and_then(Value::as_str).map(str::to_owned)
    };
    let state = Some("#/components/schemas/ServiceState".to_string());
    for (method, path, status) in [
        ("GET", "/v1/services/{name}", "200"),
        ("PUT", "/v1/services/{name}", "200"),
        ("PUT", "/v1/services/{name}", "201"),
        ("DELETE", "/v1/services/{name}", "200"),
        ("PUT", "/v1/services/{name}/canary", "200"),
        ("POST", "/v1/services/{name}/rollback", "200"),
        ("POST", "/v1/services/{name}/promote", "200"),
    ] {
        assert_eq!(answers(method, path, status), state, "{DOCUMENT}: {method} {path} {status} answers a ServiceState");
    }
    for (path, schema_name) in [
        ("/healthz", "Health"),
        ("/v1/services", "ServiceList"),
        ("/v1/datapath", "DatapathStatus"),
        ("/v1/audit", "AuditLog"),
    ] {
        assert_eq!(
            answers("GET", path, "200"),
            Some(format!("#/components/schemas/{schema_name}")),
            "{DOCUMENT}: GET {path} 200 answers a {schema_name}"
        );
    }
    // GET /v1/audit?limit=N
    let limit = operations[&("GET".to_string(), "/v1/audit".to_string())]
        .get("parameters")
        .and_then(Value::as_array)
        .and_then(|ps| ps.iter().map(|p| resolve(&doc, p)).find(|p| p["name"] == "limit"))
        .unwrap_or_else(|| panic!("{DOCUMENT}: GET /v1/audit must document the `limit` query parameter"));
    assert_eq!(limit["in"], "query", "GET /v1/audit: `limit` is a query parameter");
    assert_eq!(limit["schema"]["type"], "integer", "GET /v1/audit: `limit` is an integer");
    // GET /metrics is text.
    let metrics = resolve(&doc, at(operations[&("GET".to_string(), "/metrics".to_string())], "responses/200"));
    let media: Vec<&String> = metrics["content"].as_object().map(|c| c.keys().collect()).unwrap_or_default();
    assert!(
        !media.is_empty()
            && media.iter().all(|m| m.starts_with("application/openmetrics-text") || m.starts_with("text/plain")),
        "{DOCUMENT}: GET /metrics answers OpenMetrics text, documented as {media:?}"
    );
}

#[test]
fn openapi_spec_validator_accepts_the_document() {
    let path = repo_root().join(DOCUMENT);
    let (ok, output) = spec_validator(&path);
    assert!(ok && output.contains("OK"), "python3 -m openapi_spec_validator rejects {}:\n{output}", path.display());

    // And it really checks: a path parameter left undeclared is refused.
    let mut broken = document();
    let item = broken["paths"]["/v1/services/{name}"].as_object_mut().expect("the path item");
    item.remove("parameters");
    for operation in item.values_mut() {
        if let Some(operation) = operation.as_object_mut() {
            operation.remove("parameters");
        }
    }
    let file = std::env::temp_dir().join(format!("sockshift-openapi-broken-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_string_pretty(&broken).unwrap()).expect("writing the broken copy");
    let (ok, output) = spec_validator(&file);
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "openapi-spec-validator accepts a document with an undeclared path parameter:\n{output}");
}
