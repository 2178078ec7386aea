//! `crr-bench latency-proxy`: S3-like latency in front of a local server. Every request
//! waits a uniform 20-40 ms (by default) before it is forwarded, as a call to S3 in
//! another region waits on the network; bodies stream through both ways, and the `Host`
//! header and every signed header pass untouched, so servers that check SigV4 (s3s-fs)
//! accept the requests.
//!
//! With `--tls-cert`/`--tls-key` it accepts HTTPS (forwarding plain HTTP upstream): an
//! HTTPS endpoint for tools to talk to, as S3's are, so what a client spends on TLS and
//! saves by not signing payloads over it (UNSIGNED-PAYLOAD) is measured.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS acceptor for the PEM certificate chain and private key in these files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} holds no PEM certificate chain", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} holds no PEM private key", key.display()))?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not make a server configuration")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves on `listen` until killed, forwarding to `upstream` (`http://host:port`).
/// With `tls`, connections are accepted over TLS.
pub async fn serve(
    listen: SocketAddr,
    upstream: &str,
    min: Duration,
    max: Duration,
    tls: Option<TlsAcceptor>,
) -> Result<()> {
    let upstream: Uri = upstream
        .parse()
        .context("--upstream must be http://host:port")?;
    let authority = upstream
        .authority()
        .context("--upstream has no host:port")?
        .clone();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    // The address first, on its own line: scripts read it to know the port.
    println!(
        "{}",
        json!({ "listening": local.to_string(), "upstream": upstream.to_string() })
    );
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                // A failed handshake ends this connection only.
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        serve_connection(stream, client, authority, min, max).await;
                    }
                }
                None => serve_connection(stream, client, authority, min, max).await,
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    client: Client<HttpConnector, Incoming>,
    authority: hyper::http::uri::Authority,
    min: Duration,
    max: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let client = client.clone();
        let authority = authority.clone();
        async move { forward(&client, &authority, req, min, max).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    authority: &hyper::http::uri::Authority,
    req: Request<Incoming>,
    min: Duration,
    max: Duration,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    if !max.is_zero() {
        tokio::time::sleep(delay(min, max)).await;
    }
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .unwrap_or_default();
    client.request(Request::from_parts(parts, body)).await
}

/// A uniform draw in `min..=max`.
fn delay(min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    let span = (max - min).as_micros() as u64;
    min + Duration::from_micros(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_in_range() {
        let (min, max) = (Duration::from_millis(20), Duration::from_millis(40));
        for _ in 0..1000 {
            let d = delay(min, max);
            assert!(d >= min && d <= max, "{d:?}");
        }
        assert_eq!(delay(max, min), max);
    }
}
