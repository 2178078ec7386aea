//! A function's execution environments: `--instances N` processes, each behind its own
//! Runtime API emulator, as Lambda runs one execution environment per invocation in
//! flight. Every invocation, whoever sends it (an SQS poller, the schedule, the Invoke
//! API on any instance's port), goes to an idle instance, waiting for one when all N are
//! busy: as with a function whose concurrency is N, never two invocations in one process.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Semaphore;

use super::runtime_api::{Emulator, InvokeResult, lock};

/// The instances of one function; clones share them.
#[derive(Clone)]
pub struct Instances(Arc<Inner>);

struct Inner {
    emulators: Vec<Emulator>,
    /// Indexes of the idle instances, the longest idle first (so all of them get work).
    idle: Mutex<VecDeque<usize>>,
    /// One permit per idle instance.
    free: Semaphore,
}

/// An instance taken for one invocation; handed back when dropped, also when the
/// invocation's caller goes away (an Invoke API client that hung up).
struct Taken<'a> {
    inner: &'a Inner,
    index: usize,
    // Released after `drop` has put the index back (fields drop after `Drop::drop`).
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        lock(&self.inner.idle).push_back(self.index);
    }
}

impl Instances {
    /// Starts `count` emulators on 127.0.0.1: the first on `port` (0 picks a free one),
    /// the others on free ports. Each serves its instance's Runtime API and the Invoke
    /// API of the whole function.
    pub async fn start(name: &str, count: usize, port: u16, timeout: Duration) -> Result<Self> {
        let count = count.max(1);
        let mut emulators = Vec::with_capacity(count);
        let mut listeners = Vec::with_capacity(count);
        for i in 0..count {
            let (emulator, listener) =
                Emulator::bind(name, if i == 0 { port } else { 0 }, timeout).await?;
            emulators.push(emulator);
            listeners.push(listener);
        }
        let instances = Instances(Arc::new(Inner {
            idle: Mutex::new((0..count).collect()),
            free: Semaphore::new(count),
            emulators,
        }));
        for (emulator, listener) in instances.0.emulators.iter().zip(listeners) {
            emulator.serve(listener, instances.invoke_api());
        }
        Ok(instances)
    }

    /// Every instance's emulator, in order (the first one is on `--port`).
    pub fn emulators(&self) -> &[Emulator] {
        &self.0.emulators
    }

    /// Addresses of the emulators, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.emulators.iter().map(Emulator::addr).collect()
    }

    /// Invokes the function on an idle instance (waiting for one) and waits for its answer.
    pub async fn invoke(&self, payload: Bytes) -> InvokeResult {
        let taken = match self.0.free.acquire().await {
            Ok(permit) => match lock(&self.0.idle).pop_front() {
                Some(index) => Taken {
                    inner: &self.0,
                    index,
                    _permit: permit,
                },
                // A permit is only ever held with an index: not reached.
                None => return no_instance(),
            },
            // The semaphore is never closed: not reached.
            Err(_) => return no_instance(),
        };
        self.0.emulators[taken.index].invoke(payload).await
    }

    /// Stops every emulator (and so every supervised process).
    pub fn shutdown(&self) {
        for emulator in &self.0.emulators {
            emulator.shutdown();
        }
    }

    /// `POST /2015-03-31/functions/NAME/invocations`, as Lambda's Invoke API answers it.
    fn invoke_api(&self) -> Router {
        Router::new()
            .route("/2015-03-31/functions/{name}/invocations", post(invoke_api))
            .with_state(self.clone())
    }
}

fn no_instance() -> InvokeResult {
    InvokeResult::Error(Bytes::from_static(
        br#"{"errorType":"Runtime.Unavailable","errorMessage":"no instance of the function is available"}"#,
    ))
}

async fn invoke_api(
    State(instances): State<Instances>,
    Path(_name): Path<String>,
    body: Bytes,
) -> Response {
    match instances.invoke(body).await {
        InvokeResult::Ok(b) => (StatusCode::OK, b).into_response(),
        InvokeResult::Error(b) => {
            (StatusCode::OK, [("x-amz-function-error", "Unhandled")], b).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One HTTP/1.1 request with `Connection: close`; returns the whole response.
    async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    }

    /// What a function process does: takes invocations from its Runtime API and answers
    /// each with the port it was taken from, after `hold`.
    async fn fake_function(addr: SocketAddr, hold: Duration) {
        let base = "/2018-06-01/runtime/invocation";
        while let Some(next) = http(addr, "GET", &format!("{base}/next"), "").await {
            let Some(id) = next.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("lambda-runtime-aws-request-id: ")
                    .map(|v| v.trim().to_string())
            }) else {
                return;
            };
            tokio::time::sleep(hold).await;
            let answer = addr.port().to_string();
            http(addr, "POST", &format!("{base}/{id}/response"), &answer).await;
        }
    }

    #[tokio::test]
    async fn invocations_in_flight_at_once_go_to_different_instances() -> Result<()> {
        let instances = Instances::start("f", 3, 0, Duration::from_secs(30)).await?;
        for addr in instances.addrs() {
            tokio::spawn(fake_function(addr, Duration::from_millis(300)));
        }
        // Three at once: each instance answers one, whatever the order.
        let answers =
            futures::future::join_all((0..3).map(|_| instances.invoke(Bytes::from_static(b"{}"))))
                .await;
        let mut ports: Vec<String> = answers
            .into_iter()
            .map(|a| match a {
                InvokeResult::Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                InvokeResult::Error(b) => panic!("{}", String::from_utf8_lossy(&b)),
            })
            .collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 3, "{ports:?}");
        instances.shutdown();
        Ok(())
    }
}
