//! `crr console`: the web console, served from this binary on loopback with the
//! operator's own AWS credentials.
//!
//! Every page is drawn in the browser from the JSON of `api.rs`, and every answer there is
//! computed by the code the CLI commands run (`rule_admin`, `status`, `verify`, backfill,
//! redrive): the console is another view, not a second implementation.
//!
//! Security: the server binds 127.0.0.1 by default; it answers only requests whose `Host`
//! names the address it listens on (a page of another site cannot reach it through DNS
//! rebinding); every request that changes anything carries the per-process CSRF token that
//! only the console's own page holds (in a `<meta>` tag, never in a cookie); no credential
//! leaves the process (the page sees rules, statuses and object keys only).

mod api;
mod assets;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use crr_shared::adapters::s3::S3Clients;
use crr_shared::dynamo::DynamoStore;
use crr_shared::status::StatusService;

use crate::{AwsArgs, QueueArgs};

#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// Address to serve on. Loopback by default: the console acts with your credentials.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Open the console in the default browser once it is up.
    #[arg(long)]
    open: bool,
    /// Seconds S3 may take to deliver an event to the queue (see `synced_up_to`).
    #[arg(long, env = "CRR_STATUS_SETTLE_SECS", default_value_t = 60)]
    settle_secs: u64,
    #[command(flatten)]
    queue: QueueArgs,
}

/// What every handler shares.
pub(crate) struct Console {
    pub state: Arc<DynamoStore>,
    pub s3: S3Clients,
    pub sdk: aws_config::SdkConfig,
    pub status: StatusService,
    pub queue: QueueArgs,
    /// The token every state-changing request must carry (`x-crr-csrf`).
    pub csrf: String,
    /// `Host` header values this server answers to.
    pub hosts: Vec<String>,
}

pub async fn run(aws: &AwsArgs, args: ConsoleArgs) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = Arc::new(aws.state(&sdk).await);
    let status = crate::status_cmd::service(
        &sdk,
        state.clone(),
        &args.queue,
        Duration::from_secs(args.settle_secs),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "crr: warning: the console listens on {addr}, beyond this machine; anyone who reaches it acts with your AWS credentials"
        );
    }
    let console = Arc::new(Console {
        state,
        s3: S3Clients::new(sdk.clone()),
        sdk,
        status,
        queue: args.queue,
        csrf: new_token(),
        hosts: host_names(addr),
    });
    let url = format!("http://{}/", console.hosts[0]);
    println!("crr console: {url}");
    if args.open {
        open_browser(&url);
    }
    axum::serve(listener, router(console))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("console server")?;
    Ok(())
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .merge(assets::routes())
        .merge(api::routes())
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Refuses requests for another host name, and changes without the CSRF token; adds the
/// headers that keep the page from being framed or leaking its address.
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !console.hosts.iter().any(|h| h == host) {
        return api::error(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this console answers for {} only", console.hosts[0]),
            None,
        )
        .into_response();
    }
    let changes = !matches!(request.method().as_str(), "GET" | "HEAD");
    // Streams opened by EventSource cannot set headers: they carry the token in the query.
    let query_token = request
        .uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("csrf=").map(str::to_string))
        })
        .unwrap_or_default();
    let header_token = request
        .headers()
        .get("x-crr-csrf")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let needs_token = changes || request.uri().path().ends_with("/verify");
    if needs_token
        && !same_secret(header_token, &console.csrf)
        && !same_secret(&query_token, &console.csrf)
    {
        return api::error(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the console page".into(),
            None,
        )
        .into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Compares in time independent of where the strings differ.
fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The `Host` values of `addr`: the address itself, and `localhost` for loopback.
fn host_names(addr: SocketAddr) -> Vec<String> {
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{}", addr.port()));
    }
    hosts
}

fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    if let Err(e) = std::process::Command::new(opener).arg(url).spawn() {
        eprintln!("crr: could not open a browser ({opener}: {e}); open {url} yourself");
    }
}

impl IntoResponse for assets::Asset {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, self.content_type)], self.body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn loopback_answers_to_localhost_too() {
        let hosts = host_names("127.0.0.1:8080".parse().unwrap());
        assert_eq!(hosts, vec!["127.0.0.1:8080", "localhost:8080"]);
        let hosts = host_names("10.0.0.1:80".parse().unwrap());
        assert_eq!(hosts, vec!["10.0.0.1:80"]);
    }
}
