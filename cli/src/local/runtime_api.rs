//! A Lambda Runtime API emulator (the `/2018-06-01/runtime/...` endpoints a function
//! binary polls) for one instance of a function, and a supervisor that keeps that
//! instance's process running. The Invoke API beside it is the whole function's
//! (`instances.rs`).
//!
//! `lambda_runtime` panics if `/next` answers anything but 200, so `/next` only ever
//! answers 200: it waits until there is an invocation to hand out.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{Notify, oneshot};

/// What the function answered.
#[derive(Debug)]
pub enum InvokeResult {
    Ok(Bytes),
    /// The function reported an error (or timed out, or crashed); the body is the error JSON.
    Error(Bytes),
}

struct Pending {
    request_id: String,
    payload: Bytes,
    deadline_ms: u64,
}

struct Inner {
    name: String,
    addr: SocketAddr,
    timeout: Duration,
    queue: Mutex<VecDeque<Pending>>,
    ready: Notify,
    waiting: Mutex<HashMap<String, oneshot::Sender<InvokeResult>>>,
    restart: Notify,
    stop: Notify,
    stopping: std::sync::atomic::AtomicBool,
}

/// Handle to a running emulator.
#[derive(Clone)]
pub struct Emulator(Arc<Inner>);

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Emulator {
    /// Binds 127.0.0.1:`port` (0 picks a free one); [`Emulator::serve`] serves it.
    pub async fn bind(
        name: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(Self, tokio::net::TcpListener)> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let emulator = Emulator(Arc::new(Inner {
            name: name.to_string(),
            addr,
            timeout,
            queue: Mutex::default(),
            ready: Notify::new(),
            waiting: Mutex::default(),
            restart: Notify::new(),
            stop: Notify::new(),
            stopping: false.into(),
        }));
        Ok((emulator, listener))
    }

    /// Serves this instance's Runtime API, and `invoke_api` beside it, on `listener`.
    pub fn serve(&self, listener: tokio::net::TcpListener, invoke_api: Router) {
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(self.clone())
            .merge(invoke_api);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("crr local: emulator stopped: {e}");
            }
        });
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    pub fn shutdown(&self) {
        self.0
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.stop.notify_waiters();
        self.0.restart.notify_waiters();
    }

    /// Invokes the function with `payload` and waits for its answer (or the timeout).
    pub async fn invoke(&self, payload: Bytes) -> InvokeResult {
        let request_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.0.waiting).insert(request_id.clone(), tx);
        lock(&self.0.queue).push_back(Pending {
            request_id: request_id.clone(),
            payload,
            deadline_ms: now_ms() + self.0.timeout.as_millis() as u64,
        });
        self.0.ready.notify_one();
        // Allow for the time the invocation may wait for a busy function.
        match tokio::time::timeout(self.0.timeout * 2, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => InvokeResult::Error(Bytes::from_static(
                br#"{"errorType":"Runtime.Exited","errorMessage":"the function process exited"}"#,
            )),
            Err(_) => {
                lock(&self.0.waiting).remove(&request_id);
                lock(&self.0.queue).retain(|p| p.request_id != request_id);
                // As Lambda does, a timed-out environment is not reused.
                self.0.restart.notify_waiters();
                InvokeResult::Error(Bytes::from(format!(
                    r#"{{"errorType":"Sandbox.Timedout","errorMessage":"timed out after {} s"}}"#,
                    self.0.timeout.as_secs()
                )))
            }
        }
    }

    fn finish(&self, request_id: &str, result: InvokeResult) -> StatusCode {
        match lock(&self.0.waiting).remove(request_id) {
            Some(tx) => {
                let _ = tx.send(result);
                StatusCode::ACCEPTED
            }
            None => StatusCode::NOT_FOUND,
        }
    }

    /// Fails every invocation the (dead) process had taken.
    fn fail_all_taken(&self) {
        let queued: Vec<String> = lock(&self.0.queue)
            .iter()
            .map(|p| p.request_id.clone())
            .collect();
        let mut waiting = lock(&self.0.waiting);
        let taken: Vec<String> = waiting
            .keys()
            .filter(|id| !queued.contains(id))
            .cloned()
            .collect();
        for id in taken {
            if let Some(tx) = waiting.remove(&id) {
                let _ = tx.send(InvokeResult::Error(Bytes::from_static(
                    br#"{"errorType":"Runtime.ExitError","errorMessage":"the function process exited during the invocation"}"#,
                )));
            }
        }
    }
}

async fn next(State(emu): State<Emulator>) -> Response {
    loop {
        let pending = lock(&emu.0.queue).pop_front();
        if let Some(p) = pending {
            let mut headers = HeaderMap::new();
            let arn = format!(
                "arn:aws:lambda:us-east-1:123456789012:function:{}",
                emu.0.name
            );
            let values = [
                ("lambda-runtime-aws-request-id", p.request_id.clone()),
                ("lambda-runtime-deadline-ms", p.deadline_ms.to_string()),
                ("lambda-runtime-invoked-function-arn", arn),
                (
                    "lambda-runtime-trace-id",
                    format!("Root=1-{}", p.request_id),
                ),
            ];
            for (k, v) in values {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    headers.insert(k, v);
                }
            }
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            return (StatusCode::OK, headers, p.payload).into_response();
        }
        emu.0.ready.notified().await;
    }
}

async fn response(State(emu): State<Emulator>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    emu.finish(&id, InvokeResult::Ok(body))
}

async fn error(State(emu): State<Emulator>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    emu.finish(&id, InvokeResult::Error(body))
}

async fn init_error(body: Bytes) -> StatusCode {
    eprintln!(
        "crr local: function init error: {}",
        String::from_utf8_lossy(&body)
    );
    StatusCode::ACCEPTED
}

/// Keeps the function process running: starts it, restarts it when it exits or an
/// invocation times out, and kills it on shutdown.
pub async fn supervise(emu: Emulator, binary: PathBuf, envs: Vec<(String, String)>) {
    loop {
        if emu.0.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.env("AWS_LAMBDA_RUNTIME_API", emu.addr().to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &emu.0.name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .kill_on_drop(true);
        for (k, v) in &envs {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("crr local: cannot start {}: {e}", binary.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tokio::select! {
            status = child.wait() => {
                eprintln!("crr local: {} exited ({status:?}); restarting", emu.0.name);
                emu.fail_all_taken();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = emu.0.restart.notified() => {
                let _ = child.kill().await;
                emu.fail_all_taken();
            }
            _ = emu.0.stop.notified() => {
                let _ = child.kill().await;
                return;
            }
        }
    }
}
