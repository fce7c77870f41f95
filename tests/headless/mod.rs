//! Headless Chromium for the browser tests, driven over WebDriver (fantoccini) through a
//! `chromedriver` child process. [`Browser::open`] finds the two programs (the Debian packages
//! `chromium` and `chromium-driver`; `.ci/run` installs them), starts chromedriver on a free
//! loopback port, waits until it answers and opens a headless session; dropping the [`Browser`]
//! kills chromedriver and the browser it started, also when a test panics.
//!
//! Every wait here is bounded ([`BOUND`]; [`START_BOUND`] for starting); nothing sleeps as a
//! way to synchronise.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long chromedriver, the browser, or the page may take for any one expected event.
pub const BOUND: Duration = Duration::from_secs(10);

/// How long chromedriver may take to start and the browser to open its first session (a cold
/// start on a fresh machine reads the whole browser from disk).
pub const START_BOUND: Duration = Duration::from_secs(30);

/// Set to `1` to skip the browser tests on a machine without Chromium (they fail otherwise).
pub const SKIP_VARIABLE: &str = "LOCKSMITH_SKIP_BROWSER_TEST";

/// Where the screenshots go: `target/browser/` (beside cargo's `target/tmp`).
pub fn artifacts_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("browser");
    std::fs::create_dir_all(&dir).expect("create target/browser");
    dir
}

/// Empties `target/browser/` of the screenshots of an earlier run.
fn clear_screenshots() {
    let Ok(entries) = std::fs::read_dir(artifacts_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "png") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// True (after a loud line on stderr) when the browser tests are to be skipped on purpose.
pub fn skipped() -> bool {
    if std::env::var(SKIP_VARIABLE).is_ok_and(|v| v == "1") {
        eprintln!(
            "\n!!!! {SKIP_VARIABLE}=1: the browser test is SKIPPED; the live page is NOT \
             checked in a real browser !!!!\n"
        );
        return true;
    }
    false
}

/// The first of `names` found on `PATH` (or in /usr/bin), or the test fails saying what to
/// install.
fn find_program(names: &[&str]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]);
    for dir in dirs {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "none of {names:?} is installed. The browser test needs headless Chromium and its \
         WebDriver: `apt-get install chromium chromium-driver` (Debian; .ci/run does this), or \
         set {SKIP_VARIABLE}=1 to skip it on purpose"
    );
}

/// A `chromedriver` child process in a process group of its own; dropping it kills the group
/// (chromedriver and the browser it started) and reaps chromedriver.
struct Chromedriver {
    child: Child,
    /// The port it listens on (loopback).
    port: u16,
}

impl Chromedriver {
    /// Starts chromedriver on a free loopback port and waits until its `/status` says it is
    /// ready (within [`START_BOUND`]). Tries three ports: another process may take the free port
    /// first.
    async fn start(program: &Path, log: &Path) -> Chromedriver {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Chromedriver::try_start(program, log).await {
                Ok(driver) => return driver,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("chromedriver did not start: {failures:#?}");
    }

    /// Starts chromedriver on a free port; `Err` if it exits before it is ready (the port was
    /// taken meanwhile, or it cannot run). Fails if it does not answer within [`START_BOUND`].
    async fn try_start(program: &Path, log: &Path) -> Result<Chromedriver, String> {
        let port = free_port();
        let log_file = std::fs::File::create(log).expect("create the chromedriver log");
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut driver = Chromedriver { child, port };
        let deadline = Instant::now() + START_BOUND;
        loop {
            if let Some(status) = driver.child.try_wait().expect("poll chromedriver") {
                return Err(format!(
                    "chromedriver exited ({status}) before it was ready; its output: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
            if status_ready(port).await {
                return Ok(driver);
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer ready on port {port} within {START_BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group chromedriver leads: itself and the browser it started.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A port nobody listened on a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// Whether chromedriver on `port` answers `GET /status` with `"ready": true` (`false` while it
/// does not answer yet). Reads only as far as the `ready` field: chromedriver keeps the
/// connection open.
async fn status_ready(port: u16) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            response.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&response).replace(' ', "");
            if text.contains("\"ready\":true") {
                return Some(true);
            }
            if text.contains("\"ready\":false") {
                return Some(false);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The value of `call`, which must succeed within [`BOUND`]; else the test fails, saying `what`
/// it was doing.
async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    bounded_by(BOUND, what, call).await
}

/// The value of `call`, which must succeed within `bound`.
async fn bounded_by<T, E: std::fmt::Display>(
    bound: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    match tokio::time::timeout(bound, call).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {bound:?}"),
    }
}

/// A headless Chromium session; chromedriver dies with it.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    /// Declared after `client` so that it is dropped after it.
    _driver: Chromedriver,
}

impl Browser {
    /// Starts chromedriver and opens a headless Chromium session (1280×900). Fails, saying
    /// what to install, when chromedriver or Chromium is missing.
    pub async fn open() -> Browser {
        let chromedriver = find_program(&["chromedriver"]);
        let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"]);
        clear_screenshots();
        let driver =
            Chromedriver::start(&chromedriver, &artifacts_dir().join("chromedriver.log")).await;
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("an object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let session = bounded_by(
            START_BOUND,
            &format!("open a headless {} session", chromium.display()),
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{}", driver.port)),
        )
        .await;
        Browser {
            client: session,
            _driver: driver,
        }
    }

    /// Opens `url` and waits until an element matches `selector`.
    pub async fn open_page(&self, url: &str, selector: &str) {
        bounded(&format!("open {url}"), self.client.goto(url)).await;
        let found = self
            .client
            .wait()
            .at_most(BOUND)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(selector))
            .await;
        if let Err(e) = found {
            let shot = self.screenshot("failed-open.png").await;
            let source = self.client.source().await.unwrap_or_default();
            panic!(
                "{url}: nothing matched `{selector}` within {BOUND:?} ({e}); screenshot {}; \
                 the page:\n{}",
                shot.display(),
                source.chars().take(2000).collect::<String>()
            );
        }
    }

    /// Runs `script` (the body of a function returning JSON) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        bounded(
            "run a script in the page",
            self.client.execute(script, vec![]),
        )
        .await
    }

    /// Polls `read` (a script returning JSON) every 50 ms until `check` accepts its result,
    /// which is returned; after [`BOUND`] saves `failed-<name>.png` and fails with the last
    /// result and `check`'s last complaint.
    pub async fn wait_until(
        &self,
        name: &str,
        read: &str,
        mut check: impl FnMut(&Value) -> Result<(), String>,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let state = self.eval(read).await;
            let complaint = match check(&state) {
                Ok(()) => return state,
                Err(complaint) => complaint,
            };
            if tokio::time::Instant::now() >= deadline {
                let shot = self
                    .screenshot(&format!("failed-{}.png", name.replace(' ', "-")))
                    .await;
                panic!(
                    "the page did not show {name} within {BOUND:?}: {complaint}\n\
                     the page showed: {state:#}\nscreenshot: {}",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the viewport as `target/browser/<file>` and returns its path.
    pub async fn screenshot(&self, file: &str) -> PathBuf {
        let png = bounded("take a screenshot", self.client.screenshot()).await;
        let path = artifacts_dir().join(file);
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Ends the WebDriver session (the browser quits); chromedriver is killed on drop.
    pub async fn close(self) {
        let _ = tokio::time::timeout(BOUND, self.client.clone().close()).await;
    }
}
