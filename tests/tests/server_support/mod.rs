//! Shared by `server_e2e.rs` and `browser.rs`: start the real `search-server` binary, find
//! the real weights, make a small gallery of coloured shapes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

/// `<workspace root>/../shared` (or `$DEEP_METRIC_SHARED`, for checkouts elsewhere), or
/// `None` (with a message) when it is absent.
pub fn shared_dir() -> Option<PathBuf> {
    let p = std::env::var_os("DEEP_METRIC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("..")
                .join("shared")
        });
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: ../shared not found ({})", p.display());
        None
    }
}

/// The real EfficientNet-Lite0 weights, or `None` with a message.
pub fn weights() -> Option<PathBuf> {
    let p = shared_dir()?.join("models/efficientnet-lite0/efficientnet-lite0-57934424.pth");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("skipping: weights not found at {}", p.display());
        None
    }
}

/// `target/debug/search-server`, found from this test executable (`target/debug/deps/x`).
pub fn server_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let p = dir.join(format!("search-server{}", std::env::consts::EXE_SUFFIX));
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} not built (run `cargo build -p search-server` first)",
            p.display()
        );
        None
    }
}

/// A PNG of a shape (0 = square, 1 = disc, 2 = triangle, 3 = stripes) in `fg` on `bg`.
pub fn shape_png(shape: u32, fg: [u8; 3], bg: [u8; 3], size: u32) -> Vec<u8> {
    let s = size as i64;
    let img = RgbImage::from_fn(size, size, |x, y| {
        let (x, y) = (x as i64, y as i64);
        let inside = match shape % 4 {
            0 => x > s / 4 && x < 3 * s / 4 && y > s / 4 && y < 3 * s / 4,
            1 => (x - s / 2).pow(2) + (y - s / 2).pow(2) < (s / 3).pow(2),
            2 => y > s / 5 && y < 4 * s / 5 && (x - s / 2).abs() < (y - s / 5) / 2,
            _ => (x / (s / 8).max(1)) % 2 == 0,
        };
        Rgb(if inside { fg } else { bg })
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Writes `classes × per_class` images as `dir/<class>/<i>.png`; returns their paths.
pub fn make_gallery(dir: &Path, classes: &[(&str, [u8; 3])], per_class: u32) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for (c, (name, fg)) in classes.iter().enumerate() {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for i in 0..per_class {
            let bg = [
                (30 + 40 * i) as u8,
                (200 - 30 * c as u32) as u8,
                (90 + 20 * i) as u8,
            ];
            let p = dir.join(name).join(format!("{i}.png"));
            std::fs::write(&p, shape_png(c as u32 + i, *fg, bg, 160)).unwrap();
            paths.push(p);
        }
    }
    paths
}

/// A running server; killed (SIGKILL) on drop if still running.
pub struct Server {
    pub child: Child,
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the binary with `args` and waits until it listens (it logs its address).
    pub fn start(binary: &Path, args: &[&str]) -> Server {
        Server::start_command(Command::new(binary), args)
    }

    /// [`Server::start`] for a prepared command (environment, working directory).
    pub fn start_command(mut cmd: Command, args: &[&str]) -> Server {
        let mut child = cmd
            .args(args)
            .args(["--bind", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start search-server");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.trim().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(100)) {
                return Server { child, addr, log };
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "search-server exited with {status} before listening; log:\n{}",
                    log.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "search-server did not start; log:\n{}",
                log.lock().unwrap()
            );
        }
    }

    pub fn client(&self) -> search_server::client::Client {
        search_server::client::Client::new(&self.addr)
            .unwrap()
            .with_timeout(Duration::from_secs(60))
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Random ViT-S/14 weights under timm's `vit_small_patch14_dinov2.lvd142m` names and
/// shapes: the position embedding for 518 px (37×37 patches, as published) and Meta's
/// `mask_token`, which the loader must resample and drop.
pub fn write_timm_dinov2(path: &Path) {
    let dev = candle_core::Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in
        trainer::weights::expected_variables(trainer::backbone::BackboneKind::Dinov2Vits14).unwrap()
    {
        let t = if name == "pos_embed" {
            candle_core::Tensor::randn(0f32, 0.5, (1, 1 + 37 * 37, 384), &dev)
        } else if name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name == "norm.weight"
        {
            candle_core::Tensor::ones(shape, candle_core::DType::F32, &dev)
        } else if name.ends_with(".gamma") {
            candle_core::Tensor::rand(0.05f32, 0.15, shape, &dev)
        } else if name == "cls_token" {
            candle_core::Tensor::randn(0f32, 0.5, shape, &dev)
        } else {
            let fan_in = shape.dims()[1..].iter().product::<usize>().max(1);
            candle_core::Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape, &dev)
        };
        tensors.insert(name, t.unwrap());
    }
    tensors.insert(
        "mask_token".into(),
        candle_core::Tensor::zeros((1, 384), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, path).unwrap();
}
