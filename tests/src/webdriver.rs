//! A small W3C WebDriver client over `chromedriver` and headless Chromium (Debian's `chromium` and
//! `chromium-driver`): enough to drive the console like a user (open, type, click, read) and save
//! screenshots. Synchronous, like the rest of the harness.

use crate::wait_for;
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` process with one headless Chromium session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    session: String,
    base: String,
    _profile: tempfile::TempDir,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element {
    id: String,
}

impl Browser {
    /// Starts `chromedriver` (`KERNEX_CHROMEDRIVER`, default `/usr/bin/chromedriver`) on a free
    /// port and opens a session of headless Chromium (`KERNEX_CHROMIUM`, default
    /// `/usr/bin/chromium`) with an empty profile and no background traffic.
    pub fn start() -> Browser {
        let driver_bin =
            std::env::var("KERNEX_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium =
            std::env::var("KERNEX_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        for (what, path) in [("chromedriver", &driver_bin), ("chromium", &chromium)] {
            assert!(
                Path::new(path).exists(),
                "{what} not found at {path}: install Debian's chromium and chromium-driver \
                 (`./dev test-browser` does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {driver_bin}: {e}"));
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to answer", Duration::from_secs(20), || {
            ureq::get(&format!("{base}/status")).call().ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1400,1000".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let created = post(
            &format!("{base}/session"),
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}}),
        );
        let session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        let browser = Browser {
            driver,
            session,
            base,
            _profile: profile,
        };
        // Finding an element waits up to 10 s for it (a form's answer may still be loading).
        post(&browser.url("/timeouts"), json!({"implicit": 10_000}));
        browser
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    pub fn open(&self, url: &str) {
        post(&self.url("/url"), json!({"url": url}));
    }

    pub fn current_url(&self) -> String {
        get(&self.url("/url")).as_str().unwrap().to_owned()
    }

    pub fn title(&self) -> String {
        get(&self.url("/title")).as_str().unwrap().to_owned()
    }

    /// The page's text as a user sees it.
    pub fn text(&self) -> String {
        self.text_of(&self.find("body"))
    }

    /// The first element matching the CSS `selector`, or `None`.
    pub fn try_find(&self, selector: &str) -> Option<Element> {
        let found = request(
            "POST",
            &self.url("/element"),
            Some(json!({"using": "css selector", "value": selector})),
        );
        found
            .ok()
            .and_then(|v| v[ELEMENT].as_str().map(|id| Element { id: id.to_owned() }))
    }

    /// The first element matching the CSS `selector`; panics naming it and the page when absent.
    pub fn find(&self, selector: &str) -> Element {
        let element = self.try_find(selector);
        element.unwrap_or_else(|| {
            panic!(
                "no element `{selector}` on {}: {}",
                self.current_url(),
                self.try_find("body")
                    .map(|b| self.text_of(&b))
                    .unwrap_or_default()
            )
        })
    }

    /// Waits (reloading nothing: the pages refresh themselves) until `selector` matches.
    pub fn wait_for(&self, selector: &str, timeout: Duration) -> Element {
        wait_for(&format!("`{selector}` on the page"), timeout, || {
            self.try_find(selector)
        })
    }

    /// An element's text as a user sees it.
    pub fn text_of(&self, element: &Element) -> String {
        get(&self.url(&format!("/element/{}/text", element.id)))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Types `text` into the input matching `selector` (after clearing it).
    pub fn fill(&self, selector: &str, text: &str) {
        let element = self.find(selector);
        post(
            &self.url(&format!("/element/{}/clear", element.id)),
            json!({}),
        );
        post(
            &self.url(&format!("/element/{}/value", element.id)),
            json!({"text": text}),
        );
    }

    pub fn click(&self, selector: &str) {
        let element = self.find(selector);
        post(
            &self.url(&format!("/element/{}/click", element.id)),
            json!({}),
        );
    }

    /// Saves a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        let data = get(&self.url("/screenshot"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(
            "DELETE",
            &format!("{}/session/{}", self.base, self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn request(method: &str, url: &str, body: Option<Value>) -> Result<Value, String> {
    let request = ureq::request(method, url).timeout(Duration::from_secs(60));
    let result = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("{method} {url}: {e}")),
    };
    let ok = response.status() < 300;
    let body: Value = response.into_json().map_err(|e| e.to_string())?;
    if ok {
        Ok(body["value"].clone())
    } else {
        Err(format!("{method} {url}: {}", body["value"]))
    }
}

fn post(url: &str, body: Value) -> Value {
    request("POST", url, Some(body)).unwrap_or_else(|e| panic!("{e}"))
}

fn get(url: &str) -> Value {
    request("GET", url, None).unwrap_or_else(|e| panic!("{e}"))
}
