//! The Prometheus HTTP API client of the metric gates: instant queries (`/api/v1/query`) turned
//! into [`Reading`]s, and the check of a plan's queries against Prometheus' own parser at start.
//!
//! The server is named only in the agent's config file (`agent.prometheus`), never in a plan, so
//! an API caller cannot make the agent query (or send its bearer token to) anything else.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method};
use serde::Deserialize;
use serde_json::Value;

use super::metric::{expand, MetricGate, QueryContext, Reading};
use crate::{
    config::InvalidField,
    outbound::{self, excerpt, HttpUrl},
};

/// Query timeout unless `agent.prometheus_timeout_seconds` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read: a gate's query returns one series, so anything near this is a mistake.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest Prometheus error message kept (it goes to the rollout's history).
const MAX_ERROR_CHARS: usize = 512;

/// `agent.prometheus` and its options, validated.
#[derive(Clone, PartialEq)]
pub struct PrometheusEndpoint {
    pub url: HttpUrl,
    /// `Authorization: Bearer ...`, marked sensitive (hyper and `Debug` never show it).
    bearer: Option<HeaderValue>,
    pub timeout: Duration,
    /// Where the token came from, to name it in logs.
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for PrometheusEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusEndpoint")
            .field("url", &self.url)
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl PrometheusEndpoint {
    /// Validates the config keys; errors name them. The token file is read now (and again on each
    /// config reload): it must not be readable by group or others.
    pub fn from_config(
        url: &str,
        token_file: Option<&Path>,
        timeout_seconds: Option<f64>,
    ) -> Result<Self, InvalidField> {
        let parsed =
            HttpUrl::parse(url).map_err(|err| InvalidField::new("agent.prometheus", format!("{url:?} {err}")))?;
        if parsed.path_and_query.contains('?') {
            return Err(InvalidField::new(
                "agent.prometheus",
                format!("{url:?} has a query string: give the server's base URL, e.g. http://prometheus:9090"),
            ));
        }
        let timeout = match timeout_seconds {
            None => DEFAULT_TIMEOUT,
            Some(seconds) if seconds.is_finite() && (0.1..=60.0).contains(&seconds) => Duration::from_secs_f64(seconds),
            Some(seconds) => {
                return Err(InvalidField::new(
                    "agent.prometheus_timeout_seconds",
                    format!("must be from 0.1 to 60, got {seconds}"),
                ))
            }
        };
        let bearer = token_file.map(read_token).transpose()?;
        Ok(Self { url: parsed, bearer, timeout, token_file: token_file.map(Path::to_owned) })
    }
}

fn read_token(path: &Path) -> Result<HeaderValue, InvalidField> {
    let field = "agent.prometheus_bearer_token_file";
    let bad = |message: String| InvalidField::new(field, format!("{}: {message}", path.display()));
    let metadata = std::fs::metadata(path).map_err(|err| bad(err.to_string()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets group or others read it: chmod 600 (or defaultMode: 0400 for a Secret)",
            metadata.permissions().mode() & 0o777
        )));
    }
    let token = std::fs::read_to_string(path).map_err(|err| bad(err.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(bad("is empty".to_string()));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| bad("the token has characters a header cannot carry".to_string()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// What Prometheus answered to a query that ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Scalar(f64),
    /// Series: their labels as `{a="b"}` text, and their values.
    Vector(Vec<(String, f64)>),
    /// A range vector: `n` series.
    Matrix(usize),
    String,
}

/// Why a query gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("Prometheus at {server} unreachable: {message}")]
    Unreachable { server: String, message: String },
    #[error("Prometheus at {server} did not answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    /// Prometheus' own error: `error_type` is `bad_data` for a query it cannot parse.
    #[error("Prometheus refused the query ({error_type}): {message}")]
    Prometheus { error_type: String, message: String },
    #[error("Prometheus' answer is not usable: {0}")]
    Malformed(String),
}

/// Why a plan's query was refused at start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryCheckError {
    /// Prometheus' parser refused it, or its result can never be one number. Refuse the plan.
    #[error("{0}")]
    Invalid(String),
    /// Prometheus could not be asked (down, timeout, an error not about the query).
    #[error("{0}")]
    Unavailable(QueryError),
}

/// Queries one Prometheus server. Cheap to clone; every query opens its own connection.
#[derive(Debug, Clone)]
pub struct PrometheusClient {
    endpoint: PrometheusEndpoint,
}

impl PrometheusClient {
    pub fn new(endpoint: PrometheusEndpoint) -> Self {
        Self { endpoint }
    }

    pub fn endpoint(&self) -> &PrometheusEndpoint {
        &self.endpoint
    }

    /// Runs an (expanded) instant query now and reads it as a gate does: one number, no data,
    /// or an error saying why not.
    pub async fn read(&self, query: &str) -> Reading {
        match self.query(query).await {
            Ok(answer) => reading(answer),
            Err(err) => Reading::Error(err.to_string()),
        }
    }

    /// Asks Prometheus to evaluate `query` (expanded) and refuses it if its parser does, or if
    /// the result is a range vector or a string, which a gate can never read.
    pub async fn check_query(&self, query: &str) -> Result<(), QueryCheckError> {
        match self.query(query).await {
            Ok(Answer::Matrix(_)) => Err(QueryCheckError::Invalid(
                "returns a range vector: a gate needs one number, e.g. wrap it in rate(...) and sum(...)".to_string(),
            )),
            Ok(Answer::String) => Err(QueryCheckError::Invalid("returns a string, not a number".to_string())),
            Ok(_) => Ok(()),
            Err(QueryError::Prometheus { error_type, message }) if error_type == "bad_data" => {
                Err(QueryCheckError::Invalid(message))
            }
            Err(err) => Err(QueryCheckError::Unavailable(err)),
        }
    }

    /// One instant query, within the endpoint's timeout.
    pub async fn query(&self, query: &str) -> Result<Answer, QueryError> {
        let timeout = self.endpoint.timeout;
        tokio::time::timeout(timeout, self.query_without_deadline(query))
            .await
            .map_err(|_| QueryError::Timeout { server: self.endpoint.url.authority.clone(), timeout })?
    }

    async fn query_without_deadline(&self, query: &str) -> Result<Answer, QueryError> {
        let url = &self.endpoint.url;
        let unreachable = |message: String| QueryError::Unreachable { server: url.authority.clone(), message };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|err| unreachable(format!("resolving {}: {err}", url.host)))?
            .collect();
        // Prometheus stops evaluating at its own `timeout`; a little below ours, so that its
        // error (not our deadline) is what the user sees for a slow query.
        let server_timeout = format!("{}ms", (self.endpoint.timeout.as_millis() * 9 / 10).max(1));
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("timeout", &server_timeout)
            .finish();
        let path = format!("{}/api/v1/query", url.path_and_query.trim_end_matches('/'));
        let mut last_error = format!("{} resolved to no address", url.host);
        for addr in addrs {
            let request = outbound::Request {
                method: Method::POST,
                authority: &url.authority,
                path_and_query: &path,
                authorization: self.endpoint.bearer.as_ref(),
                body: Some(("application/x-www-form-urlencoded", Bytes::from(form.clone()))),
            };
            match outbound::exchange(addr, request, MAX_RESPONSE_BYTES).await {
                Ok(response) => {
                    if response.truncated {
                        return Err(QueryError::Malformed(format!(
                            "larger than {} KiB: does the query return many series?",
                            MAX_RESPONSE_BYTES / 1024
                        )));
                    }
                    return parse_answer(response.status.as_u16(), &response.body);
                }
                // Try the next address only when this one could not be reached at all.
                Err(outbound::ExchangeError::Connect { source, .. }) => last_error = format!("{addr}: {source}"),
                Err(err) => return Err(unreachable(err.to_string())),
            }
        }
        Err(unreachable(last_error))
    }
}

/// Checks a plan's metric gates at start, before anything changes: Prometheus is configured,
/// each query expands for the first step and Prometheus' parser accepts it. `field` names the
/// list in errors (`gates.metrics`), so a refusal reads `gates.metrics[1].query: ...` with
/// Prometheus' own message. Prometheus being unreachable also refuses the plan: a gate that
/// cannot be checked now would only hold the first step. The queries are checked at once, so
/// this takes at most the client's timeout; the first refusal in plan order is answered.
pub async fn check_plan_queries(
    client: Option<&PrometheusClient>,
    gates: &[MetricGate],
    context: &QueryContext<'_>,
    field: &str,
) -> Result<(), InvalidField> {
    if gates.is_empty() {
        return Ok(());
    }
    let Some(client) = client else {
        return Err(InvalidField::new(
            field,
            "metric gates need a Prometheus server: set agent.prometheus in the agent's config file",
        ));
    };
    let mut queries = Vec::with_capacity(gates.len());
    for (i, gate) in gates.iter().enumerate() {
        let query = expand(&gate.query, context)
            .map_err(|err| InvalidField::new(format!("{field}[{i}].query"), err.to_string()))?;
        queries.push(query);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, query) in queries.into_iter().enumerate() {
        let client = client.clone();
        tasks.spawn(async move { (i, client.check_query(&query).await) });
    }
    let mut refusals = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((_, Ok(()))) => {}
            Ok((i, Err(err))) => refusals.push((i, err)),
            Err(err) => {
                refusals.push((usize::MAX, QueryCheckError::Invalid(format!("the check's task failed: {err}"))))
            }
        }
    }
    refusals.sort_by_key(|(i, _)| *i);
    match refusals.into_iter().next() {
        None => Ok(()),
        Some((i, err)) => {
            let at = if i == usize::MAX { field.to_string() } else { format!("{field}[{i}].query") };
            Err(match err {
                QueryCheckError::Invalid(message) => InvalidField::new(at, format!("Prometheus refuses it: {message}")),
                QueryCheckError::Unavailable(err) => InvalidField::new(at, format!("cannot be checked: {err}")),
            })
        }
    }
}

/// Reads every gate's query (expanded for `context`) at once: `readings[i]` is `gates[i]`'s,
/// ready for [`super::metric::judge`] or [`super::metric::EarlyWatch::observe`]. Takes at most
/// the client's timeout, however many gates there are.
pub async fn read_gates(client: &PrometheusClient, gates: &[MetricGate], context: &QueryContext<'_>) -> Vec<Reading> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut readings = vec![Reading::Error("not queried".to_string()); gates.len()];
    for (i, gate) in gates.iter().enumerate() {
        match expand(&gate.query, context) {
            Ok(query) => {
                let client = client.clone();
                tasks.spawn(async move { (i, client.read(&query).await) });
            }
            Err(err) => readings[i] = Reading::Error(err.to_string()),
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, reading)) = done {
            readings[i] = reading;
        }
    }
    readings
}

/// `/api/v1/query`'s JSON envelope.
#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Value,
}

/// Reads an answer of `/api/v1/query` (any status: Prometheus answers errors as JSON with 400,
/// 422 or 503).
pub fn parse_answer(status: u16, body: &[u8]) -> Result<Answer, QueryError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|_| {
        QueryError::Malformed(format!("HTTP {status}, not Prometheus API JSON: {:?}", excerpt(body, 200)))
    })?;
    if envelope.status != "success" {
        return Err(QueryError::Prometheus {
            error_type: envelope.error_type.unwrap_or_else(|| format!("HTTP {status}")),
            message: excerpt(envelope.error.unwrap_or_default().as_bytes(), MAX_ERROR_CHARS),
        });
    }
    let data = envelope.data.ok_or_else(|| QueryError::Malformed("success without data".to_string()))?;
    let malformed = |what: &str| QueryError::Malformed(format!("{} result: {what}", data.result_type));
    match data.result_type.as_str() {
        "scalar" => Ok(Answer::Scalar(sample_value(&data.result).ok_or_else(|| malformed("no [time, value]"))?)),
        "vector" => {
            let series = data.result.as_array().ok_or_else(|| malformed("not a list"))?;
            series
                .iter()
                .map(|one| {
                    let labels = labels_text(&one["metric"]);
                    let value = sample_value(&one["value"]).ok_or_else(|| malformed("a series without a value"))?;
                    Ok((labels, value))
                })
                .collect::<Result<_, _>>()
                .map(Answer::Vector)
        }
        "matrix" => Ok(Answer::Matrix(data.result.as_array().map_or(0, Vec::len))),
        "string" => Ok(Answer::String),
        other => Err(QueryError::Malformed(format!("unknown resultType {other:?}"))),
    }
}

/// `[unix_time, "value"]`: Prometheus sends values as strings (`"0.2"`, `"NaN"`, `"+Inf"`).
fn sample_value(sample: &Value) -> Option<f64> {
    sample.get(1)?.as_str()?.parse().ok()
}

fn labels_text(metric: &Value) -> String {
    let pairs: Vec<String> = metric
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), |s| format!("{s:?}"))))
                .collect()
        })
        .unwrap_or_default();
    format!("{{{}}}", pairs.join(","))
}

/// An answer as a gate reads it.
pub fn reading(answer: Answer) -> Reading {
    let number = |value: f64| {
        if value.is_nan() {
            Reading::NoData
        } else {
            // ±Inf as ±MAX: the same against any finite bound, and representable in JSON.
            Reading::Value(value.clamp(-f64::MAX, f64::MAX))
        }
    };
    match answer {
        Answer::Scalar(value) => number(value),
        Answer::Vector(series) => match series.as_slice() {
            [] => Reading::NoData,
            [(_, value)] => number(*value),
            [(labels, _), ..] => Reading::Error(format!(
                "the query returned {} series (the first is {}); a gate needs one number: aggregate them, e.g. with sum(...)",
                series.len(),
                excerpt(labels.as_bytes(), 200)
            )),
        },
        Answer::Matrix(n) => Reading::Error(format!("the query returned a range vector ({n} series), not one number")),
        Answer::String => Reading::Error("the query returned a string, not a number".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Answer, QueryError> {
        parse_answer(200, body.as_bytes())
    }

    fn read(body: &str) -> Reading {
        reading(parse(body).unwrap())
    }

    #[test]
    fn one_number_is_a_value() {
        assert_eq!(
            read(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1718000000.1,"0.2"]}]}}"#
            ),
            Reading::Value(0.2)
        );
        assert_eq!(
            read(r#"{"status":"success","data":{"resultType":"scalar","result":[1718000000,"3"]}}"#),
            Reading::Value(3.0)
        );
        assert_eq!(
            read(r#"{"status":"success","data":{"resultType":"scalar","result":[1718000000,"+Inf"]}}"#),
            Reading::Value(f64::MAX)
        );
        assert_eq!(
            read(r#"{"status":"success","data":{"resultType":"scalar","result":[1718000000,"-Inf"]}}"#),
            Reading::Value(-f64::MAX)
        );
    }

    #[test]
    fn nothing_to_judge_is_no_data() {
        assert_eq!(read(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#), Reading::NoData);
        assert_eq!(
            read(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"value":[1,"NaN"]}]}}"#
            ),
            Reading::NoData
        );
    }

    #[test]
    fn several_series_and_other_shapes_are_errors_naming_them() {
        let two = read(
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"code":"200"},"value":[1,"5"]},{"metric":{"code":"500"},"value":[1,"1"]}]}}"#,
        );
        let Reading::Error(message) = two else { panic!("{two:?}") };
        assert!(message.contains("2 series") && message.contains(r#"{code="200"}"#), "{message}");
        let matrix =
            read(r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"]]}]}}"#);
        assert!(matches!(matrix, Reading::Error(m) if m.contains("range vector")));
        assert!(matches!(
            read(r#"{"status":"success","data":{"resultType":"string","result":[1,"x"]}}"#),
            Reading::Error(_)
        ));
    }

    #[test]
    fn prometheus_errors_keep_their_type_and_text() {
        let body = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:6: parse error: unexpected right parenthesis ')'"}"#;
        assert_eq!(
            parse_answer(400, body.as_bytes()),
            Err(QueryError::Prometheus {
                error_type: "bad_data".into(),
                message: "invalid parameter \"query\": 1:6: parse error: unexpected right parenthesis ')'".into()
            })
        );
        let html = parse_answer(404, b"<html>404 page not found</html>").unwrap_err();
        assert!(
            matches!(&html, QueryError::Malformed(m) if m.contains("HTTP 404") && m.contains("404 page not found")),
            "{html:?}"
        );
        assert!(matches!(parse("{\"status\":\"success\"}"), Err(QueryError::Malformed(_))));
    }

    #[test]
    fn config_is_validated_naming_the_key() {
        let endpoint = PrometheusEndpoint::from_config("http://prometheus.monitoring:9090/prom/", None, None).unwrap();
        assert_eq!(endpoint.url.authority, "prometheus.monitoring:9090");
        assert_eq!(endpoint.timeout, DEFAULT_TIMEOUT);
        let err =
            |url: &str, timeout: Option<f64>| PrometheusEndpoint::from_config(url, None, timeout).unwrap_err().field;
        assert_eq!(err("https://prometheus:9090", None), "agent.prometheus");
        assert_eq!(err("http://prometheus:9090/?x=1", None), "agent.prometheus");
        assert_eq!(err("http://user:pw@prometheus:9090", None), "agent.prometheus");
        assert_eq!(err("http://prometheus:9090", Some(0.0)), "agent.prometheus_timeout_seconds");
        assert_eq!(err("http://prometheus:9090", Some(f64::NAN)), "agent.prometheus_timeout_seconds");
    }

    #[test]
    fn token_files_must_be_private_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("sockshift-prom-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PrometheusEndpoint::from_config("http://p:9090", Some(&path), None).unwrap_err();
        assert_eq!(err.field, "agent.prometheus_bearer_token_file");
        assert!(err.message.contains("mode 644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let endpoint = PrometheusEndpoint::from_config("http://p:9090", Some(&path), None).unwrap();
        assert_eq!(endpoint.bearer.as_ref().unwrap().to_str().unwrap(), "Bearer s3cret-token");
        assert!(!format!("{endpoint:?}").contains("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(PrometheusEndpoint::from_config("http://p:9090", Some(&path), None)
            .unwrap_err()
            .message
            .contains("empty"));
        let missing = PrometheusEndpoint::from_config("http://p:9090", Some(&dir.join("nope")), None).unwrap_err();
        assert_eq!(missing.field, "agent.prometheus_bearer_token_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
