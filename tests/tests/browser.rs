//! The web page in a real browser: headless Chromium driven through chromedriver's
//! WebDriver protocol (plain HTTP + JSON with the server crate's small client). Loads the
//! page, uploads an image through the file input, waits for the result thumbnails, narrows
//! them with the filter box, asks for more like a result, deletes one with the API key,
//! checks that a server error is shown to the user, and saves a screenshot.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`);
//! skipped with a message when they are absent.

mod server_support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use search_server::client::Client;
use serde_json::{json, Value};
use server_support::{make_gallery, server_binary, weights, Server};

/// W3C WebDriver's key for element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .flat_map(|d| {
                    candidates
                        .iter()
                        .map(move |c| d.join(Path::new(c).file_name().unwrap()))
                })
                .find(|p| p.is_file())
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A chromedriver process and one browser session.
struct Browser {
    driver: Child,
    http: Client,
    session: String,
}

impl Browser {
    fn start(chromedriver: &Path, chromium: &Path, profile: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver");
        let mut http = Client::new(&format!("127.0.0.1:{port}"))
            .unwrap()
            .with_timeout(Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http
            .get("/status")
            .map(|r| r.json()["value"]["ready"] == true)
            .unwrap_or(false)
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_str().unwrap(),
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let mut b = Browser {
            driver,
            http,
            session: String::new(),
        };
        let v = b.call("POST", "/session", caps);
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver command; panics with the driver's message on error.
    fn call(&mut self, method: &str, path: &str, body: Value) -> Value {
        let bytes = if method == "GET" || method == "DELETE" {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let r = self
            .http
            .request(
                method,
                path,
                &[("Content-Type", "application/json")],
                &bytes,
            )
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {}", r.text());
        v["value"].clone()
    }

    fn cmd(&mut self, method: &str, what: &str, body: Value) -> Value {
        let path = format!("/session/{}{what}", self.session);
        self.call(method, &path, body)
    }

    fn script(&mut self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    fn element(&mut self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    /// Polls `js` until it returns true.
    fn wait_for(&mut self, js: &str, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.script(js) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn upload(&mut self, file: &Path) {
        let input = self.element("#file");
        self.cmd(
            "POST",
            &format!("/element/{input}/value"),
            json!({"text": file.to_str().unwrap()}),
        );
    }

    /// Types `text` into the input `css` (replacing what it holds).
    fn type_into(&mut self, css: &str, text: &str) {
        let el = self.element(css);
        self.cmd("POST", &format!("/element/{el}/clear"), json!({}));
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            json!({ "text": text }),
        );
    }

    fn screenshot(&mut self, to: &Path) {
        let b64 = self.cmd("GET", "/screenshot", Value::Null);
        std::fs::write(to, base64_decode(b64.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = self.http.request("DELETE", &path, &[], &[]);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// chromedriver and chromium, or `None` with a message.
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    let Some(chromedriver) = find_program(&["/usr/bin/chromedriver", "chromedriver"]) else {
        eprintln!("skipping: chromedriver not found (apt-get install chromium chromium-driver)");
        return None;
    };
    let Some(chromium) =
        find_program(&["/usr/bin/chromium", "chromium", "/usr/bin/chromium-browser"])
    else {
        eprintln!("skipping: chromium not found (apt-get install chromium chromium-driver)");
        return None;
    };
    Some((chromedriver, chromium))
}

/// A fresh server has an empty gallery: the page says how to fill it, and the hint goes away
/// once an image is added through the page (with the API key).
#[test]
fn empty_gallery_page_explains_how_to_add_images() {
    let (Some(bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let Some((chromedriver, chromium)) = browser_programs() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(
        &bin,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--api-key",
            "secret",
        ],
    );
    let mut b = Browser::start(
        &chromedriver,
        &chromium,
        &tmp.path().join("chromium-profile"),
    );
    b.cmd(
        "POST",
        "/url",
        json!({"url": format!("http://{}/", server.addr)}),
    );
    b.wait_for(
        "return document.getElementById('status').textContent.includes('images')",
        "the page to load its config",
        Duration::from_secs(20),
    );
    let visible = "const e = document.getElementById('empty-gallery'); \
                   return !e.hidden && e.getBoundingClientRect().height > 0";
    assert_eq!(b.script(visible), true, "empty-gallery hint shown");
    let text = b.script("return document.getElementById('empty-gallery').innerText");
    let text = text.as_str().unwrap();
    for needle in ["Add this image to the gallery", "--gallery", "indexer add"] {
        assert!(text.contains(needle), "missing {needle}: {text}");
    }
    assert_eq!(
        b.script("return document.getElementById('empty-upload').hidden"),
        false,
        "uploading is allowed here"
    );

    // Add one image through the page with the key: the hint disappears.
    let img = tmp.path().join("first.png");
    std::fs::write(
        &img,
        server_support::shape_png(1, [230, 30, 30], [20, 90, 200], 128),
    )
    .unwrap();
    b.upload(&img);
    b.script(
        "document.getElementById('add-panel').open = true; \
         document.getElementById('api-key').value = 'secret';",
    );
    b.wait_for(
        "return !document.getElementById('add-btn').disabled",
        "the add button",
        Duration::from_secs(20),
    );
    let add = b.element("#add-btn");
    b.cmd("POST", &format!("/element/{add}/click"), json!({}));
    b.wait_for(
        "return document.getElementById('empty-gallery').hidden",
        "the hint to go once the gallery has an image",
        Duration::from_secs(60),
    );
    let notice = b.script("return document.getElementById('notice').textContent");
    assert!(notice.as_str().unwrap().contains("Added"), "{notice}");
    assert_eq!(
        server.client().get("/api/config").unwrap().json()["gallery_items"],
        1
    );
}

#[test]
fn page_uploads_an_image_and_shows_result_thumbnails() {
    let (Some(bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let Some((chromedriver, chromium)) = browser_programs() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gallery = tmp.path().join("gallery");
    let classes = [
        ("red", [230, 30, 30]),
        ("blue", [30, 40, 230]),
        ("yellow", [240, 220, 30]),
    ];
    let files = make_gallery(&gallery, &classes, 3);
    let data = tmp.path().join("data");
    let server = Server::start(
        &bin,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--gallery",
            gallery.to_str().unwrap(),
            "--api-key",
            "secret",
        ],
    );

    let mut b = Browser::start(
        &chromedriver,
        &chromium,
        &tmp.path().join("chromium-profile"),
    );
    b.cmd(
        "POST",
        "/url",
        json!({"url": format!("http://{}/", server.addr)}),
    );
    b.wait_for(
        "return document.getElementById('status').textContent.includes('images')",
        "the page to load its config",
        Duration::from_secs(20),
    );
    assert_eq!(
        b.script("return document.title"),
        "Deep Metric — image search"
    );
    assert_eq!(
        b.script("return document.getElementById('key-row').hidden"),
        false,
        "API key field shown"
    );
    assert_eq!(
        b.script("return document.getElementById('empty-gallery').hidden"),
        true,
        "no empty-gallery hint over a gallery"
    );

    // Upload a gallery image: results appear, best first is the image itself.
    b.upload(&files[4]);
    b.wait_for(
        "const imgs = [...document.querySelectorAll('#grid li img')]; \
         return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)",
        "result thumbnails",
        Duration::from_secs(60),
    );
    let n = b
        .script("return document.querySelectorAll('#grid li').length")
        .as_u64()
        .unwrap();
    assert_eq!(n, 9, "all 9 gallery images are shown with k=10");
    assert_eq!(
        b.script("return document.querySelector('#grid li .label').textContent"),
        "blue"
    );
    assert_eq!(
        b.script("return document.getElementById('preview').hidden"),
        false,
        "preview shown"
    );

    // The filter box narrows the results to one label.
    b.type_into("#filter", r#"{"label": "red"}"#);
    b.script("document.getElementById('search-btn').click()");
    b.wait_for(
        "const ls = [...document.querySelectorAll('#grid li .label')].map(l => l.textContent); \
         return ls.length === 3 && ls.every(l => l === 'red')",
        "only the red results",
        Duration::from_secs(60),
    );
    // A malformed filter is explained, not ignored.
    b.script("document.getElementById('filter').value = '{label'");
    b.script("document.getElementById('search-btn').click()");
    b.wait_for(
        "return !document.getElementById('error').hidden && \
         document.getElementById('error').textContent.includes('not valid JSON')",
        "the filter error",
        Duration::from_secs(20),
    );
    b.script("document.getElementById('filter').value = ''");

    // More like this: the clicked item leaves the results, the others of its class lead.
    let first = b.script("return document.querySelector('#grid li').dataset.id");
    b.script("document.getElementById('search-btn').click()");
    b.wait_for(
        "return document.querySelectorAll('#grid li').length === 9",
        "all results again",
        Duration::from_secs(60),
    );
    let target = b.script("return document.querySelectorAll('#grid li')[1].dataset.id");
    b.script("document.querySelectorAll('#grid li')[1].querySelector('button.similar').click()");
    b.wait_for(
        &format!(
            "return document.getElementById('notice').textContent.includes('More like image {}')",
            target.as_str().unwrap()
        ),
        "the more-like-this results",
        Duration::from_secs(30),
    );
    let ids = b.script("return [...document.querySelectorAll('#grid li')].map(l => l.dataset.id)");
    assert!(!ids.as_array().unwrap().contains(&target), "{ids}");
    assert_eq!(
        b.script("return document.querySelector('#grid li .label').textContent"),
        "blue"
    );

    // Delete a result with the API key: its card goes, and it is gone from the server.
    b.type_into("#api-key", "secret");
    let victim = first.as_str().unwrap().to_string();
    b.script(&format!(
        "[...document.querySelectorAll('#grid li')].find(l => l.dataset.id === '{victim}') \
         ?.querySelector('button.delete')?.click() ?? \
         document.querySelector('#grid li button.delete').click()"
    ));
    b.wait_for(
        "return document.getElementById('notice').textContent.startsWith('Deleted image')",
        "the delete",
        Duration::from_secs(30),
    );
    let deleted = b
        .script("return document.getElementById('notice').textContent.match(/\\d+/)[0]")
        .as_str()
        .unwrap()
        .to_string();
    let mut c = server.client();
    assert_eq!(
        c.get(&format!("/api/images/{deleted}")).unwrap().status,
        404
    );
    b.wait_for(
        "return document.getElementById('status').textContent.startsWith('8 images')",
        "the gallery count to drop",
        Duration::from_secs(20),
    );
    b.script("document.getElementById('search-btn').click()");
    b.wait_for(
        "return document.querySelectorAll('#grid li').length === 8",
        "results without the deleted image",
        Duration::from_secs(60),
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("search-page-results.png");
    b.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
    assert!(image::open(&shot).unwrap().width() >= 800);

    // A server-side error reaches the user: a text file named .png.
    let fake = tmp.path().join("fake.png");
    std::fs::write(&fake, "this is not an image").unwrap();
    b.upload(&fake);
    b.wait_for(
        "return !document.getElementById('error').hidden",
        "the error message",
        Duration::from_secs(20),
    );
    let msg = b.script("return document.getElementById('error').textContent");
    assert!(msg.as_str().unwrap().contains("not an image"), "{msg}");
}
