//! A minimal blocking HTTP/1.1 client for the CLI: one request per connection, JSON bodies.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the sockshift API at {addr}: {cause} (is `sockshift agent` running? set --api)")]
    Connect { addr: SocketAddr, cause: std::io::Error },
    #[error("talking to the sockshift API at {addr}: {cause}")]
    Io { addr: SocketAddr, cause: std::io::Error },
    #[error("the sockshift API at {addr} sent a malformed response")]
    Malformed { addr: SocketAddr },
    /// The API answered with an error status; `message` is its own.
    #[error("{message} (HTTP {status}, {code})")]
    Api { status: u16, code: String, message: String },
}

/// A response: status and parsed JSON body (Null when empty).
pub struct Response {
    pub status: u16,
    pub body: Value,
}

pub fn request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response, ClientError> {
    let io = |cause| ClientError::Io { addr, cause };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|cause| ClientError::Connect { addr, cause })?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw).ok_or(ClientError::Malformed { addr })
}

/// Like `request`, but an error status becomes `ClientError::Api`.
pub fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let response = request(addr, token, method, path, body)?;
    if (200..300).contains(&response.status) {
        return Ok(response.body);
    }
    let text = |key: &str| response.body.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    Err(ClientError::Api { status: response.status, code: text("code"), message: text("message") })
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = &raw[split + 4..];
    let chunked =
        head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let decoded;
    if chunked {
        decoded = dechunk(body)?;
        body = &decoded;
    }
    // Non-JSON bodies (a webhook receiver's "ok") are kept as a string.
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    };
    Some(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"a\": 1.5}\n";
        let r = parse_response(plain).unwrap();
        assert_eq!((r.status, r.body["a"].as_f64()), (200, Some(1.5)));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n: 2\r\n1\r\n}\r\n0\r\n\r\n";
        let r = parse_response(chunked).unwrap();
        assert_eq!((r.status, r.body["a"].as_i64()), (404, Some(2)));
    }
}
