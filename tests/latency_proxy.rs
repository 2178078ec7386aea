//! `crr-bench latency-proxy`, the S3-like latency the benchmarks put in front of local
//! servers: requests pass through to s3s-fs (which checks SigV4) with bodies intact, each
//! one after its added wait.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_tests::{S3Server, Stack, bin, unique};

struct Proxy(std::process::Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the proxy in front of `upstream`; returns it and its `http://addr`.
fn start(upstream: &str, min_ms: u64, max_ms: u64) -> Result<(Proxy, String)> {
    let mut child = Command::new(bin("crr-bench")?)
        .args(["latency-proxy", "--upstream", upstream])
        .args([
            "--min-ms",
            &min_ms.to_string(),
            "--max-ms",
            &max_ms.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting crr-bench latency-proxy")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("first line is JSON")?;
    let addr = v["listening"]
        .as_str()
        .context("listening address")?
        .to_string();
    Ok((Proxy(child), format!("http://{addr}")))
}

#[tokio::test]
async fn requests_pass_through_signed_and_intact_after_the_added_wait() -> Result<()> {
    let stack = Stack::from_env()?;
    let (_proxy, url) = start(&stack.s3s.endpoint, 20, 40)?;
    let through = S3Server {
        endpoint: url,
        region: stack.s3s.region.clone(),
    };
    let s3 = stack.s3(&through);
    let bucket = unique("lat");
    stack.create_bucket(&through, &bucket).await?;
    // 3 MiB both ways: the bodies stream through whole.
    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    s3.put_object()
        .bucket(&bucket)
        .key("dir/a b+c%.bin")
        .body(ByteStream::from(body.clone()))
        .send()
        .await?;
    let got = s3
        .get_object()
        .bucket(&bucket)
        .key("dir/a b+c%.bin")
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    ensure!(
        got.as_ref() == body.as_slice(),
        "the body came back changed"
    );
    // Ten requests one after another wait at least ten times the minimum.
    let started = Instant::now();
    for _ in 0..10 {
        s3.head_object()
            .bucket(&bucket)
            .key("dir/a b+c%.bin")
            .send()
            .await?;
    }
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_millis(200),
        "10 requests took {took:?}, less than 10 x 20 ms"
    );
    Ok(())
}
