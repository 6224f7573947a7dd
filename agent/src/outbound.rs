//! HTTP requests the agent itself sends (Prometheus queries, webhooks): strict URL parsing and one
//! bounded exchange.
//!
//! Each request gets its own connection to an address the caller has chosen (and, for webhooks,
//! checked after DNS), so no pool can reuse a connection to a host that has since been refused.
//! The caller wraps the exchange in its total deadline; this module caps what is read, so a server
//! that streams forever costs the agent at most `max_body` bytes and the deadline, never memory.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::{
    header::{CONNECTION, CONTENT_TYPE, HOST, USER_AGENT},
    HeaderValue, Method, StatusCode, Uri,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Longest URL accepted anywhere (webhooks, the Prometheus address).
pub const MAX_URL_BYTES: usize = 2048;

/// hyper's read buffer: the smallest it allows. A response head must fit in it, and it bounds
/// how far hyper reads ahead of the body cap.
const READ_BUFFER_BYTES: usize = 16 * 1024;

const USER_AGENT_VALUE: &str = concat!("sockshift/", env!("CARGO_PKG_VERSION"));

/// An `http://` URL that passed the strict checks of [`HttpUrl::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host as written, lowercased, without IPv6 brackets or a trailing dot.
    pub host: String,
    pub port: u16,
    /// What goes into the `Host` header: the host as written, with the port unless it is 80.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path_and_query: String,
}

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("is longer than {MAX_URL_BYTES} bytes")]
    TooLong,
    #[error("has a byte that no URL may contain (0x{byte:02x} at offset {offset}): control characters, spaces, quotes and non-ASCII must be percent-encoded")]
    ForbiddenByte { byte: u8, offset: usize },
    #[error("is not a URL: {0}")]
    Syntax(String),
    #[error(
        "must start with http:// (got {0:?}; TLS is not supported: use an in-cluster http receiver or a local relay)"
    )]
    NotHttp(String),
    #[error("has no host")]
    NoHost,
    #[error("carries credentials (user@host): put secrets in a header-checking relay, not in the URL")]
    Credentials,
    #[error("has a fragment (#...), which is never sent")]
    Fragment,
    #[error("has port 0")]
    PortZero,
    #[error("host {0:?} is not a DNS name or an IP address")]
    BadHost(String),
}

impl HttpUrl {
    /// Parses with `http::Uri` after refusing every byte RFC 3986 does not allow, so that nothing
    /// the URL carries can end up as a header or a second request.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        if text.len() > MAX_URL_BYTES {
            return Err(UrlError::TooLong);
        }
        if let Some((offset, &byte)) = text.as_bytes().iter().enumerate().find(|(_, b)| !is_uri_byte(**b)) {
            return Err(UrlError::ForbiddenByte { byte, offset });
        }
        if text.contains('#') {
            return Err(UrlError::Fragment);
        }
        let uri: Uri = text.parse().map_err(|err: http::uri::InvalidUri| UrlError::Syntax(err.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(UrlError::NotHttp(other.to_string())),
            None => return Err(UrlError::NotHttp(String::new())),
        }
        let authority = uri.authority().ok_or(UrlError::NoHost)?;
        if authority.as_str().contains('@') {
            return Err(UrlError::Credentials);
        }
        let written_host = authority.host();
        let host =
            written_host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        check_host(&host)?;
        // `Authority::port_u16` is `None` for a port that does not fit in 16 bits (`:99999`),
        // which must be an error, not port 80.
        let port = match authority.as_str().strip_prefix(written_host).and_then(|rest| rest.strip_prefix(':')) {
            None => 80,
            Some(text) => {
                text.parse::<u16>().map_err(|_| UrlError::Syntax(format!("port {text:?} is not 1 to 65535")))?
            }
        };
        if port == 0 {
            return Err(UrlError::PortZero);
        }
        let host_for_header = written_host.trim_end_matches('.').to_ascii_lowercase();
        let authority = if port == 80 { host_for_header } else { format!("{host_for_header}:{port}") };
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let path_and_query = if path_and_query.is_empty() { "/" } else { path_and_query }.to_string();
        Ok(Self { host, port, authority, path_and_query })
    }

    /// The host as an IP address, when it is written as one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.host.parse().ok()
    }
}

/// RFC 3986's unreserved, reserved and `%`: anything else (controls, space, `"`, `<`, `>`, `\`,
/// `^`, `` ` ``, `{`, `|`, `}`, non-ASCII) is refused.
fn is_uri_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&byte)
}

/// A DNS name (letters, digits, `-`, `.`) or an IP literal. A name whose last label starts with a
/// digit must be a dotted-quad IPv4 address: the resolver would otherwise read `2852039166` or
/// `0251.0376.0251.0376` as 169.254.169.254 behind the checks' back.
fn check_host(host: &str) -> Result<(), UrlError> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let bad = || UrlError::BadHost(host.to_string());
    if host.len() > 253 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return Err(bad());
    }
    if host.split('.').any(|label| label.is_empty() || label.len() > 63) {
        return Err(bad());
    }
    let last = host.rsplit('.').next().unwrap_or_default();
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(())
}

/// A request for [`exchange`].
#[derive(Debug)]
pub struct Request<'a> {
    pub method: Method,
    /// The `Host` header ([`HttpUrl::authority`]).
    pub authority: &'a str,
    pub path_and_query: &'a str,
    /// `Authorization` header value, if any.
    pub authorization: Option<&'a HeaderValue>,
    /// Body and its content type.
    pub body: Option<(&'static str, Bytes)>,
}

/// A response whose body was read up to the cap.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
    /// The server had more to send than the cap; the rest was never read.
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
}

/// Connects to `addr`, sends `request` on a fresh HTTP/1.1 connection and reads at most
/// `max_body` bytes of the answer. No deadline of its own: wrap it in `tokio::time::timeout`.
pub async fn exchange(addr: SocketAddr, request: Request<'_>, max_body: usize) -> Result<Response, ExchangeError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| ExchangeError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(READ_BUFFER_BYTES)
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|source| ExchangeError::Http { addr, source })?;
    // The connection task ends with the exchange: aborted on drop (deadline, cap or done).
    let connection = AbortOnDrop(tokio::spawn(connection));
    let mut builder = http::Request::builder()
        .method(request.method)
        .uri(request.path_and_query)
        .header(HOST, request.authority)
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(CONNECTION, "close");
    if let Some(value) = request.authorization {
        builder = builder.header(http::header::AUTHORIZATION, value.clone());
    }
    let body = match request.body {
        Some((content_type, bytes)) => {
            builder = builder.header(CONTENT_TYPE, content_type);
            bytes
        }
        None => Bytes::new(),
    };
    let response = sender
        .send_request(builder.body(Full::new(body))?)
        .await
        .map_err(|source| ExchangeError::Http { addr, source })?;
    let status = response.status();
    let mut incoming = response.into_body();
    let mut body = BytesMut::new();
    let mut truncated = false;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|source| ExchangeError::Http { addr, source })?;
        let Ok(data) = frame.into_data() else { continue };
        let room = max_body - body.len();
        if data.len() > room {
            body.extend_from_slice(&data[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&data);
    }
    drop(connection);
    Ok(Response { status, body: body.freeze(), truncated })
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// At most `max_chars` of a response body as one printable line, for logs and history: a
/// receiver cannot inject log lines or terminal escapes.
pub fn excerpt(body: &[u8], max_chars: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(max_chars)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string();
    if text.chars().count() > max_chars {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> UrlError {
        HttpUrl::parse(text).expect_err(text)
    }

    #[test]
    fn good_urls_parse_with_host_port_and_path() {
        let url = HttpUrl::parse("http://Hooks.Example.svc:8080/a/b?x=1&y=%20").unwrap();
        assert_eq!(url.host, "hooks.example.svc");
        assert_eq!(url.port, 8080);
        assert_eq!(url.authority, "hooks.example.svc:8080");
        assert_eq!(url.path_and_query, "/a/b?x=1&y=%20");
        let url = HttpUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!((url.port, url.authority.as_str(), url.path_and_query.as_str()), (80, "127.0.0.1", "/"));
        let url = HttpUrl::parse("http://[::1]:9000/hook").unwrap();
        assert_eq!((url.host.as_str(), url.authority.as_str()), ("::1", "[::1]:9000"));
        assert_eq!(url.ip(), Some("::1".parse().unwrap()));
    }

    #[test]
    fn control_characters_spaces_and_injection_are_refused() {
        let injection = "http://10.244.3.9:8080/x HTTP/1.1\r\nHost: a\r\n\r\nPOST /admin HTTP/1.1\r\nX: ";
        assert_eq!(err(injection), UrlError::ForbiddenByte { byte: b' ', offset: 24 });
        assert_eq!(err("http://127.0.0.1/a\rb"), UrlError::ForbiddenByte { byte: b'\r', offset: 18 });
        assert_eq!(err("http://127.0.0.1/a\nb"), UrlError::ForbiddenByte { byte: b'\n', offset: 18 });
        assert_eq!(err("http://127.0.0.1/a\tb"), UrlError::ForbiddenByte { byte: b'\t', offset: 18 });
        assert_eq!(err("http://127.0.0.1/\u{7f}"), UrlError::ForbiddenByte { byte: 0x7f, offset: 17 });
        assert!(matches!(err("http://127.0.0.1/é"), UrlError::ForbiddenByte { .. }));
        assert!(matches!(err("http://127.0.0.1/{x}"), UrlError::ForbiddenByte { byte: b'{', .. }));
        assert!(matches!(err("http://127.0.0.1/\"x"), UrlError::ForbiddenByte { byte: b'"', .. }));
        assert_eq!(err(&format!("http://a/{}", "x".repeat(MAX_URL_BYTES))), UrlError::TooLong);
    }

    #[test]
    fn other_schemes_credentials_fragments_and_odd_hosts_are_refused() {
        assert_eq!(err("https://example.test/"), UrlError::NotHttp("https".into()));
        assert_eq!(err("ftp://example.test/"), UrlError::NotHttp("ftp".into()));
        assert!(matches!(err("/relative/only"), UrlError::NotHttp(_)));
        assert_eq!(err("http://user:pw@example.test/"), UrlError::Credentials);
        assert_eq!(err("http://@example.test/"), UrlError::Credentials);
        assert_eq!(err("http://example.test/#frag"), UrlError::Fragment);
        assert_eq!(err("http://example.test:0/"), UrlError::PortZero);
        assert!(matches!(err("http://example.test:99999/"), UrlError::Syntax(_)));
        assert!(matches!(err("http://example.test:/"), UrlError::Syntax(_)));
        assert!(matches!(err("http://[::1]:65536/"), UrlError::Syntax(_)));
        assert!(matches!(err("http:///path"), UrlError::Syntax(_) | UrlError::NoHost));
        for host in [
            "2852039166",
            "0251.0376.0251.0376",
            "0xa9.0xfe.0xa9.0xfe",
            "169.254.169.254.",
            "a..b",
            "a_b.c",
            "%31.2.3.4",
        ] {
            let url = format!("http://{host}/");
            match HttpUrl::parse(&url) {
                Err(UrlError::BadHost(_) | UrlError::Syntax(_)) => {}
                // A trailing dot is dropped, leaving the literal (which the webhook policy then checks).
                Ok(parsed) if host == "169.254.169.254." => assert_eq!(parsed.host, "169.254.169.254"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn excerpts_are_one_printable_line() {
        assert_eq!(excerpt(b"bad\r\nFake-Log: line\x1b[31m", 100), "bad  Fake-Log: line [31m");
        assert_eq!(excerpt(b"abcdef", 3), "abc…");
    }
}
