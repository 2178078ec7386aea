//! A fault-injecting HTTP proxy between crr and an S3 server, on 127.0.0.1.
//!
//! Each request draws its fate from a seeded generator keyed by the request itself
//! (method, path and query, and how many times that same request was seen), so the n-th
//! attempt of a given request meets the same fault whatever the interleaving: a failing
//! run is replayed with the same seed. Faults are what S3 and the network produce:
//! - `503 SlowDown` with S3's XML body, before the request reaches the server;
//! - `500 InternalError`, half the time after the server applied the request (the reply
//!   is lost, the effect is not), half before;
//! - a connection reset: the request is applied, then the connection dies before or
//!   during the response body;
//! - a truncated body: the response announces its full length and stops half-way;
//! - added latency (up to `max_latency`) before the request is forwarded.
//!
//! The `Host` header and every signed header are forwarded untouched, so servers that
//! check SigV4 (s3s-fs) still accept the requests.
//!
//! For failure tests the proxy can *refuse* chosen requests ([`FaultProxy::refuse`]): every
//! request of a method whose path starts with a prefix gets a given S3 error (403
//! AccessDenied, 500 InternalError...) until [`FaultProxy::allow_all`], whether faults are
//! on or not.
//!
//! For rate tests the proxy can *watch* the requests of one method ([`FaultProxy::watch`]):
//! how many are in flight at once (the peak, taken and reset by [`FaultStats::take_peak`]),
//! and when each one that succeeded was answered, with its body's size
//! ([`FaultStats::answered`]); and it can add a fixed latency to them
//! ([`FaultProxy::delay`]), as a real S3 has, so that concurrency shows.
//!
//! For integrity tests the proxy can *alter* one chosen request's body
//! ([`FaultProxy::corrupt`]): one byte of it is flipped on the way, its length and headers
//! kept, as a faulty network or middlebox would.
//!
//! For race tests the proxy can also *hold* one chosen request ([`FaultProxy::hold`]):
//! the request is read whole, then kept from the server until the test releases it, so a
//! test decides exactly which of two concurrent writes lands last.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type ProxyBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// How often each fault happens, per request.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub seed: u64,
    pub slow_down: f64,
    pub internal_error: f64,
    pub reset: f64,
    pub truncate: f64,
    pub latency: f64,
    pub max_latency: Duration,
}

impl FaultPlan {
    /// No faults at all.
    pub fn none(seed: u64) -> Self {
        Self {
            seed,
            slow_down: 0.0,
            internal_error: 0.0,
            reset: 0.0,
            truncate: 0.0,
            latency: 0.0,
            max_latency: Duration::ZERO,
        }
    }

    /// `rate` of all requests fail, spread over the four failure kinds, and as many again
    /// are delayed by up to 50 ms.
    pub fn failing(seed: u64, rate: f64) -> Self {
        Self {
            seed,
            slow_down: rate * 0.4,
            internal_error: rate * 0.2,
            reset: rate * 0.2,
            truncate: rate * 0.2,
            latency: rate,
            max_latency: Duration::from_millis(50),
        }
    }
}

/// What the proxy did, for the run's report.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub requests: AtomicU64,
    pub slow_down: AtomicU64,
    pub internal_error: AtomicU64,
    pub reset: AtomicU64,
    pub truncated: AtomicU64,
    pub delayed: AtomicU64,
    /// Watched requests forwarded and not yet answered.
    pub in_flight: AtomicU64,
    /// Most watched requests in flight at once since the last `take_peak`.
    pub peak_in_flight: AtomicU64,
    /// Watched requests answered 2xx: when, and their body's size.
    answered: Mutex<Vec<(std::time::Instant, u64)>>,
}

impl FaultStats {
    /// The peak of watched requests in flight since the last call; the next peak starts
    /// from what is in flight now.
    pub fn take_peak(&self) -> u64 {
        let now = self.in_flight.load(Ordering::SeqCst);
        self.peak_in_flight.swap(now, Ordering::SeqCst)
    }

    /// Watched requests answered 2xx so far: (when, body bytes), in order.
    pub fn answered(&self) -> Vec<(std::time::Instant, u64)> {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests that failed (not counting delays).
    pub fn faults(&self) -> u64 {
        [
            &self.slow_down,
            &self.internal_error,
            &self.reset,
            &self.truncated,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    /// One line for logs and notes.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} requests: {} SlowDown, {} InternalError, {} resets, {} truncated bodies, {} delayed",
            g(&self.requests),
            g(&self.slow_down),
            g(&self.internal_error),
            g(&self.reset),
            g(&self.truncated),
            g(&self.delayed)
        )
    }
}

/// The fate of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Pass,
    SlowDown,
    InternalErrorBefore,
    InternalErrorAfter,
    Reset,
    Truncate,
    Delay(Duration),
}

/// A request to hold when it comes: the first one with this method whose path (without
/// the query) is `path`.
struct PendingHold {
    method: String,
    path: String,
    arrived: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

/// One held request, seen from the test.
pub struct Held {
    arrived: tokio::sync::oneshot::Receiver<()>,
    release: tokio::sync::oneshot::Sender<()>,
}

impl Held {
    /// Waits (up to `timeout`) until the request has reached the proxy and is held there.
    pub async fn arrived(&mut self, timeout: Duration) -> Result<()> {
        tokio::time::timeout(timeout, &mut self.arrived)
            .await
            .context("the request to hold never came")?
            .context("the proxy stopped before the request came")
    }

    /// Lets the held request go on to the server.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

/// Requests answered with an error instead of being forwarded.
struct Refusal {
    method: String,
    path_prefix: String,
    status: StatusCode,
    code: String,
}

struct Shared {
    /// Requests to hold, in the order they were asked for.
    holds: Mutex<Vec<PendingHold>>,
    refusals: Mutex<Vec<Refusal>>,
    /// Requests (method, path) whose body is to be altered on the way, once each.
    corruptions: Mutex<Vec<(String, String)>>,
    /// Faults only while on: setup and checks go through untouched.
    active: std::sync::atomic::AtomicBool,
    upstream: String,
    plan: FaultPlan,
    stats: Arc<FaultStats>,
    seen: Mutex<HashMap<String, u64>>,
    /// The method watched (see `FaultProxy::watch`), and the latency added to it.
    watched: Mutex<Option<(String, Duration)>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: use it as the S3 endpoint.
    pub endpoint: String,
    pub stats: Arc<FaultStats>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`) on a free loopback port.
    pub async fn start(upstream: &str, plan: FaultPlan) -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(FaultStats::default());
        let shared = Arc::new(Shared {
            holds: Mutex::new(Vec::new()),
            refusals: Mutex::new(Vec::new()),
            corruptions: Mutex::new(Vec::new()),
            active: std::sync::atomic::AtomicBool::new(false),
            upstream: upstream.trim_end_matches('/').to_string(),
            plan,
            stats: stats.clone(),
            seen: Mutex::new(HashMap::new()),
            watched: Mutex::new(None),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let control = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { shared.handle(req).await }
                    });
                    // Errors here are the injected resets and truncations themselves.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            endpoint: format!("http://{addr}"),
            stats,
            shared: control,
            task,
        })
    }

    /// Holds the next `method` request for `path` (as sent: `/bucket/percent-encoded-key`,
    /// without the query) until [`Held::release`]; a held request dropped unreleased goes
    /// on too.
    pub fn hold(&self, method: &str, path: &str) -> Held {
        let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        self.shared
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(PendingHold {
                method: method.to_string(),
                path: path.to_string(),
                arrived: arrived_tx,
                release: release_rx,
            });
        Held {
            arrived: arrived_rx,
            release: release_tx,
        }
    }

    /// Flips one byte in the middle of the body of the next `method` request for `path`
    /// (as sent, without the query), whether faults are on or not.
    pub fn corrupt(&self, method: &str, path: &str) {
        self.shared
            .corruptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((method.to_string(), path.to_string()));
    }

    /// Answers every `method` request whose path (as sent, without the query) starts with
    /// `path_prefix` with `status` and the S3 error `code`, until [`FaultProxy::allow_all`].
    pub fn refuse(&self, method: &str, path_prefix: &str, status: u16, code: &str) {
        self.shared
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Refusal {
                method: method.to_string(),
                path_prefix: path_prefix.to_string(),
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                code: code.to_string(),
            });
    }

    /// Ends every [`FaultProxy::refuse`].
    pub fn allow_all(&self) {
        self.shared
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Watches the requests of `method` (see `FaultStats::take_peak`, `answered`).
    pub fn watch(&self, method: &str) {
        self.delay(method, Duration::ZERO);
    }

    /// Watches the requests of `method` and forwards each only after `latency`.
    pub fn delay(&self, method: &str, latency: Duration) {
        *self
            .shared
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((method.to_string(), latency));
    }

    /// Turns fault injection on or off (off when started).
    pub fn set_faults(&self, on: bool) {
        self.shared.active.store(on, Ordering::SeqCst);
    }
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>FAULTPROXY0000001</RequestId><HostId>fault-proxy</HostId></Error>"
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        "application/xml".parse().expect("static header"),
    );
    resp
}

impl Shared {
    fn fate(&self, key: &str) -> Fate {
        if !self.active.load(Ordering::SeqCst) {
            return Fate::Pass;
        }
        let attempt = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let n = seen.entry(key.to_string()).or_default();
            *n += 1;
            *n
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.plan.seed, key, attempt).hash(&mut h);
        let mut rng = fastrand::Rng::with_seed(h.finish());
        let p = &self.plan;
        let x = rng.f64();
        let mut edge = p.slow_down;
        if x < edge {
            return Fate::SlowDown;
        }
        edge += p.internal_error;
        if x < edge {
            return if rng.bool() {
                Fate::InternalErrorAfter
            } else {
                Fate::InternalErrorBefore
            };
        }
        edge += p.reset;
        if x < edge {
            return Fate::Reset;
        }
        edge += p.truncate;
        if x < edge {
            return Fate::Truncate;
        }
        if rng.f64() < p.latency && !p.max_latency.is_zero() {
            let ms = u64::try_from(p.max_latency.as_millis()).unwrap_or(u64::MAX);
            return Fate::Delay(Duration::from_millis(rng.u64(1..=ms.max(1))));
        }
        Fate::Pass
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let hold = {
            let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            let bare = path.split('?').next().unwrap_or_default();
            holds
                .iter()
                .position(|h| h.method == req.method().as_str() && h.path == bare)
                .map(|i| holds.remove(i))
        };
        if let Some(hold) = hold {
            let _ = hold.arrived.send(());
            // Released, or the test dropped its handle: either way the request goes on.
            let _ = hold.release.await;
        }
        let refused = {
            let refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            let bare = path.split('?').next().unwrap_or_default();
            refusals
                .iter()
                .find(|r| r.method == req.method().as_str() && bare.starts_with(&r.path_prefix))
                .map(|r| (r.status, r.code.clone()))
        };
        if let Some((status, code)) = refused {
            return Ok(xml_error(status, &code, "refused by the fault proxy"));
        }
        let corrupt = {
            let mut corruptions = self.corruptions.lock().unwrap_or_else(|p| p.into_inner());
            let bare = path.split('?').next().unwrap_or_default();
            corruptions
                .iter()
                .position(|(m, p)| m == req.method().as_str() && p == bare)
                .map(|i| corruptions.remove(i))
                .is_some()
        };
        let fate = self.fate(&format!("{} {}", req.method(), path));
        match fate {
            Fate::SlowDown => {
                self.stats.slow_down.fetch_add(1, Ordering::Relaxed);
                return Ok(xml_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SlowDown",
                    "Please reduce your request rate.",
                ));
            }
            Fate::InternalErrorBefore => {
                self.stats.internal_error.fetch_add(1, Ordering::Relaxed);
                return Ok(xml_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                ));
            }
            Fate::Delay(d) => {
                self.stats.delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(d).await;
            }
            _ => {}
        }
        let watched = self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(method, _)| method == req.method().as_str());
        let upstream = match watched {
            Some((_, latency)) => self.forward_watched(req, &path, latency).await,
            None => self.forward(req, &path, corrupt).await,
        };
        let upstream = match upstream {
            Ok(resp) => resp,
            Err(e) => {
                return Ok(xml_error(
                    StatusCode::BAD_GATEWAY,
                    "ProxyUpstreamError",
                    &format!("fault proxy could not reach the server: {e}"),
                ));
            }
        };
        let (parts, body) = upstream;
        match fate {
            Fate::InternalErrorAfter => {
                self.stats.internal_error.fetch_add(1, Ordering::Relaxed);
                Ok(xml_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                ))
            }
            Fate::Reset => {
                self.stats.reset.fetch_add(1, Ordering::Relaxed);
                // Headers, part of the body (if any), then the connection dies.
                let head = body.slice(..body.len() / 3);
                let frames = futures::stream::iter(vec![
                    Ok(Frame::data(head)),
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected reset",
                    )),
                ]);
                Ok(Response::from_parts(parts, StreamBody::new(frames).boxed()))
            }
            Fate::Truncate => {
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                // The full length announced, half the bytes sent, then the end.
                let half = body.slice(..body.len() / 2);
                let frames = futures::stream::iter(vec![Ok(Frame::data(half))]);
                Ok(Response::from_parts(parts, StreamBody::new(frames).boxed()))
            }
            _ => Ok(Response::from_parts(
                parts,
                Full::new(body).map_err(|never| match never {}).boxed(),
            )),
        }
    }

    /// `forward`, counted in flight from before the added latency to the reply, and
    /// recorded when answered 2xx.
    async fn forward_watched(
        &self,
        req: Request<Incoming>,
        path: &str,
        latency: Duration,
    ) -> Result<(hyper::http::response::Parts, Bytes)> {
        // An aws-chunked body (with a trailing checksum) says its payload's size apart.
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let size = header("x-amz-decoded-content-length")
            .or_else(|| header("content-length"))
            .unwrap_or(0);
        let now = self.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(latency).await;
        let answer = self.forward(req, path, false).await;
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Ok((parts, _)) = &answer
            && parts.status.is_success()
        {
            self.stats
                .answered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((std::time::Instant::now(), size));
        }
        answer
    }

    /// Sends the request on unchanged (headers, Host included; with `corrupt`, one byte
    /// of its body flipped) and reads the whole reply.
    async fn forward(
        &self,
        req: Request<Incoming>,
        path: &str,
        corrupt: bool,
    ) -> Result<(hyper::http::response::Parts, Bytes)> {
        let (parts, body) = req.into_parts();
        let mut body = body.collect().await?.to_bytes();
        if corrupt && !body.is_empty() {
            let mut altered = body.to_vec();
            let middle = altered.len() / 2;
            altered[middle] ^= 0x01;
            body = Bytes::from(altered);
        }
        let mut out = Request::builder()
            .method(parts.method)
            .uri(format!("{}{}", self.upstream, path))
            .version(hyper::Version::HTTP_11);
        for (name, value) in &parts.headers {
            out = out.header(name, value);
        }
        let resp = self.client.request(out.body(Full::new(body))?).await?;
        let (mut parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        // The body is re-sent whole: its framing is decided again on the way out.
        parts.headers.remove("transfer-encoding");
        parts.headers.remove("connection");
        Ok((parts, body))
    }
}
