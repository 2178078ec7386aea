//! A real browser for the console's tests: Debian's chromium, driven through its
//! chromedriver (WebDriver) with fantoccini, and `crr console` as the binary a user runs.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};

use crate::{Stack, free_port};

/// `crr console` running on a free loopback port, against one test's table.
pub struct ConsoleServer {
    child: Child,
    /// The page's address, as the console printed it.
    pub url: String,
}

impl ConsoleServer {
    /// Starts `crr --table TABLE console` with the stack's endpoints and `args`.
    pub fn start(stack: &Stack, table: &str, args: &[&str]) -> Result<Self> {
        Self::start_with_env(stack, table, args, &[])
    }

    /// As `start`, with extra environment (`(name, value)`) for the console process.
    pub fn start_with_env(
        stack: &Stack,
        table: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = stack.crr_command(table, &["console", "--listen", "127.0.0.1:0"])?;
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting crr console")?;
        let stdout = child.stdout.take().context("console stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the console's address")?;
        let url = line
            .trim()
            .strip_prefix("crr console: ")
            .with_context(|| format!("unexpected first line from crr console: {line:?}"))?
            .to_string();
        Ok(Self { child, url })
    }
}

impl ConsoleServer {
    /// `host:port` of the console.
    pub fn authority(&self) -> &str {
        self.url.trim_start_matches("http://").trim_end_matches('/')
    }

    /// One plain HTTP/1.1 request with the given `Host` and extra headers; returns the
    /// status, the response head (lower-cased) and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, String, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.authority())?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        Ok((status, head.to_ascii_lowercase(), body.to_string()))
    }
}

impl Drop for ConsoleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless chromium behind its own chromedriver, stopped by PID when dropped.
pub struct Browser {
    driver: Child,
    pub client: Client,
    profile: PathBuf,
}

/// Where screenshots go: `CRR_SCREENSHOT_DIR`, else `console-screenshots` in the target dir.
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("CRR_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::bin_dir().join("..").join("console-screenshots"))
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless chromium session.
    pub async fn start() -> Result<Self> {
        let driver_bin =
            std::env::var("CRR_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
        let chromium = std::env::var("CRR_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
        if !std::path::Path::new(&driver_bin).exists() {
            bail!(
                "{driver_bin} not found: scripts/install-tools installs Debian's chromium and chromium-driver"
            );
        }
        let port = free_port()?;
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {driver_bin}"))?;
        let profile = std::env::temp_dir().join(crate::unique("crr-chromium-profile"));
        std::fs::create_dir_all(&profile)?;
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-extensions",
                    "--window-size=1300,1100", "--force-device-scale-factor=1",
                    "--lang=en-US",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            bail!("capabilities are an object");
        };
        let webdriver = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let mut browser = None;
        let mut last_error = String::new();
        while started.elapsed() < Duration::from_secs(30) {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => {
                    browser = Some(client);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let Some(client) = browser else {
            let mut driver = driver;
            let _ = driver.kill();
            let _ = driver.wait();
            bail!("no WebDriver session with chromium in 30 s: {last_error}");
        };
        Ok(Self {
            driver,
            client,
            profile,
        })
    }

    /// Opens `url` and waits for the console's page to have drawn something.
    pub async fn open(&self, url: &str) -> Result<()> {
        self.client.goto(url).await?;
        self.wait_for("main#app > *").await?;
        Ok(())
    }

    /// The first element matching `css`, waiting up to 30 s for it.
    pub async fn wait_for(&self, css: &str) -> Result<Element> {
        self.client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("no element '{css}' on the page within 30 s"))
    }

    /// Waits up to `timeout` until the text of the element `css` satisfies `ok`; returns it.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.wait_attr_or_text(css, None, timeout, what, ok).await
    }

    /// As `wait_text`, for the attribute `attr` of the element.
    pub async fn wait_attr(
        &self,
        css: &str,
        attr: &str,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.wait_attr_or_text(css, Some(attr), timeout, what, ok)
            .await
    }

    async fn wait_attr_or_text(
        &self,
        css: &str,
        attr: Option<&str>,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let started = Instant::now();
        let mut last = String::from("(element not found)");
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                let value = match attr {
                    Some(a) => el.attr(a).await.ok().flatten(),
                    None => el.text().await.ok(),
                };
                if let Some(v) = value {
                    if ok(&v) {
                        return Ok(v);
                    }
                    last = v;
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what} ('{css}'); last seen: {last:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Clicks the element `css` (waiting for it), scrolled to the middle of the window
    /// first so the sticky top bar cannot cover it. Live pages redraw parts of themselves:
    /// an element replaced between finding and clicking is found again (a few times).
    pub async fn click(&self, css: &str) -> Result<()> {
        let mut last_error = None;
        for _ in 0..5 {
            let el = self.wait_for(css).await?;
            let clicked = async {
                self.client
                    .execute(
                        "arguments[0].scrollIntoView({block: 'center'});",
                        vec![serde_json::to_value(&el)?],
                    )
                    .await?;
                el.click().await?;
                anyhow::Ok(())
            }
            .await;
            match clicked {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no click"))
            .context(format!("clicking '{css}'")))
    }

    /// Replaces the value of the input `css` by typing `text`.
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let input = self.wait_for(css).await?;
        input.clear().await?;
        input.send_keys(text).await?;
        Ok(())
    }

    /// Saves a PNG of the whole page (the window grown to the page's height, at most
    /// 4000 px) as `<name>.png` in [`screenshot_dir`]; returns its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let height = self
            .client
            .execute("return document.documentElement.scrollHeight;", vec![])
            .await?
            .as_u64()
            .unwrap_or(1100)
            .clamp(600, 4000);
        let (width, old_height) = self.client.get_window_size().await?;
        // The window's outer height includes no browser chrome in headless mode.
        self.client
            .set_window_size(width as u32, height as u32)
            .await?;
        self.client
            .execute("window.scrollTo(0, 0);", vec![])
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self.client.screenshot().await?;
        self.client
            .set_window_size(width as u32, old_height as u32)
            .await?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        println!("screenshot: {}", path.display());
        Ok(path)
    }

    /// Ends the session (chromium quits) and stops chromedriver.
    pub async fn close(self) -> Result<()> {
        let _ = self.client.clone().close().await;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that failed half-way did not end its session: stop chromium's processes
        // (chromedriver's descendants) by PID, then chromedriver.
        let mut pids = vec![];
        descendants(self.driver.id(), &mut pids);
        for pid in pids {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Every process below `pid`, read from /proc.
fn descendants(pid: u32, out: &mut Vec<u32>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
            for child in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                out.push(child);
                descendants(child, out);
            }
        }
    }
}
