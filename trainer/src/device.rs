//! Which device the models run on: the `--device auto|cpu|cuda[:N]` flag of the programs, and
//! `--precision f32|bf16` of `trainer train` / `bench`.
//!
//! Kept separate from candle's `Device` so the flag parses (and `--help` shows it) in every
//! build, and asking for CUDA in a CPU-only build is a clear error that says how to get a
//! CUDA build rather than candle's generic "not compiled with cuda support". The error has its
//! own type, [`DeviceError`], so each program can exit with status 2 ("fix the command line
//! or the machine") instead of 1 ("failed while running").

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// Whether this build has CUDA support (the `cuda` cargo feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// The message for a CUDA request in a build without the `cuda` feature.
pub const NO_CUDA_BUILD: &str =
    "built without CUDA support: rebuild with --features cuda (scripts/cuda-build.sh)";

/// A device that cannot be used as asked (CUDA in a CPU-only build, no GPU, bad ordinal, bf16
/// on the CPU). The programs exit with status 2 on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

impl From<DeviceError> for crate::error::Error {
    fn from(e: DeviceError) -> Self {
        crate::error::Error::Invalid(e.0)
    }
}

/// A device requested on the command line. Default: `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA GPU when the build has CUDA support and one opens, else the CPU: the
    /// same command line works on a laptop and on a GPU machine.
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// An opened device and how it was chosen, for the one start-up line that says where the
/// network runs.
#[derive(Clone, Debug)]
pub struct OpenedDevice {
    pub device: Device,
    /// What was opened (`cpu` or `cuda:N`), never `auto`.
    pub choice: DeviceChoice,
    /// Why `auto` chose this device (`None` when it was asked for explicitly).
    pub reason: Option<String>,
}

impl fmt::Display for OpenedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device: {}", self.choice)?;
        if let Some(r) = &self.reason {
            write!(f, " (auto: {r})")?;
        }
        Ok(())
    }
}

impl DeviceChoice {
    /// Opens the device. CUDA fails with [`NO_CUDA_BUILD`] in a CPU-only build, and with the
    /// driver's reason (no GPU, bad ordinal, driver too old) in a CUDA build; `auto` never
    /// fails (it falls back to the CPU and says why).
    pub fn open(self) -> Result<OpenedDevice, DeviceError> {
        match self {
            DeviceChoice::Cpu => Ok(OpenedDevice {
                device: Device::Cpu,
                choice: DeviceChoice::Cpu,
                reason: None,
            }),
            DeviceChoice::Cuda(n) => Ok(OpenedDevice {
                device: open_cuda(n)?,
                choice: self,
                reason: None,
            }),
            DeviceChoice::Auto if !CUDA_BUILD => Ok(OpenedDevice {
                device: Device::Cpu,
                choice: DeviceChoice::Cpu,
                reason: Some("this build has no CUDA support".into()),
            }),
            DeviceChoice::Auto => Ok(match open_cuda(0) {
                Ok(device) => OpenedDevice {
                    device,
                    choice: DeviceChoice::Cuda(0),
                    reason: Some("the first CUDA GPU".into()),
                },
                Err(e) => OpenedDevice {
                    device: Device::Cpu,
                    choice: DeviceChoice::Cpu,
                    reason: Some(format!("no usable CUDA GPU: {e}")),
                },
            }),
        }
    }

    /// The choice that opens `device` again (e.g. in a child process).
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceChoice::Cuda(gpu_id),
            _ => DeviceChoice::Cpu,
        }
    }

    /// [`DeviceChoice::open`] without the description.
    pub fn device(self) -> Result<Device, DeviceError> {
        self.open().map(|o| o.device)
    }
}

fn open_cuda(n: usize) -> Result<Device, DeviceError> {
    if !CUDA_BUILD {
        return Err(DeviceError(format!(
            "--device cuda:{n}: this program was {NO_CUDA_BUILD}; or run on the CPU with \
             --device cpu (or auto)"
        )));
    }
    Device::new_cuda(n).map_err(|e| {
        // The driver's reason only: candle appends a backtrace when RUST_BACKTRACE is set.
        let e = e.to_string();
        let e = e.lines().next().unwrap_or_default();
        DeviceError(format!(
            "cannot open CUDA device {n}: {e} (is there a GPU and an NVIDIA driver for CUDA \
             13? `nvidia-smi` lists them; use --device cpu otherwise)"
        ))
    })
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!(
                    "unknown device '{s}': expected auto, cpu, cuda or cuda:N (N = GPU ordinal)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--device`, shared by every program that runs a network (flattened into their arguments).
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct DeviceArgs {
    /// Where the network runs: `auto` (the first CUDA GPU when this program was built with
    /// CUDA support and one is present, else the CPU), `cpu`, `cuda` or `cuda:N` (GPU
    /// ordinal N). The chosen device is printed at start-up.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub device: DeviceChoice,
}

impl DeviceArgs {
    /// Opens the device and logs the one start-up line saying which one ran.
    pub fn open(&self) -> Result<Device, DeviceError> {
        let opened = self.device.open()?;
        eprintln!("{opened}");
        Ok(opened.device)
    }
}

/// Arithmetic precision of training and benchmarking (`--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// bf16 autocast: activations and matmuls in bf16, f32 master weights and optimiser state.
    Bf16,
}

impl Precision {
    /// Refuses a precision this device and build cannot run correctly, saying what to use.
    ///
    /// bf16 is refused everywhere for now: on the CPU the fused kernels (and the 2-core
    /// machines' lack of bf16 FMA) make it slower than f32, and our CUDA kernels (depthwise
    /// conv, pooling) are f32/f64 only, so a bf16 network would not run end to end. The flag
    /// exists so scripts and the GPU check can ask for it once the bf16 kernels land.
    pub fn check(self, device: &Device) -> Result<(), DeviceError> {
        match self {
            Precision::F32 => Ok(()),
            Precision::Bf16 if device.is_cpu() => Err(DeviceError(
                "--precision bf16 needs --device cuda: on the CPU the network runs in f32; \
                 use --precision f32"
                    .into(),
            )),
            Precision::Bf16 => Err(DeviceError(
                "--precision bf16 is not available yet: the CUDA kernels (depthwise conv, \
                 pooling) are f32 only; use --precision f32"
                    .into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auto_cpu_cuda_and_ordinals() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!(DeviceChoice::default(), DeviceChoice::Auto);
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(
                err.contains("expected auto, cpu, cuda or cuda:N"),
                "{bad}: {err}"
            );
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        for s in ["auto", "cpu", "cuda:2"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn cpu_always_opens_and_cuda_needs_a_cuda_build() {
        let cpu = DeviceChoice::Cpu.open().unwrap();
        assert!(cpu.device.is_cpu());
        assert_eq!(cpu.to_string(), "device: cpu");
        let r = DeviceChoice::Cuda(0).device();
        if CUDA_BUILD {
            // With a GPU this opens it; without one the error names the device.
            if let Err(e) = r {
                assert!(e.to_string().contains("cannot open CUDA device 0"), "{e}");
            }
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(NO_CUDA_BUILD), "{e}");
            assert!(e.contains("--device cpu"), "{e}");
        }
    }

    #[test]
    fn auto_opens_a_gpu_or_falls_back_to_the_cpu_and_says_why() {
        let opened = DeviceChoice::Auto.open().unwrap();
        assert_ne!(opened.choice, DeviceChoice::Auto);
        assert_eq!(opened.device.is_cpu(), opened.choice == DeviceChoice::Cpu);
        let line = opened.to_string();
        if CUDA_BUILD {
            assert!(line.starts_with("device: "), "{line}");
        } else {
            assert_eq!(line, "device: cpu (auto: this build has no CUDA support)");
        }
    }

    #[test]
    fn bf16_is_refused_with_what_to_do() {
        assert!(Precision::F32.check(&Device::Cpu).is_ok());
        let e = Precision::Bf16.check(&Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("needs --device cuda") && e.contains("--precision f32"),
            "{e}"
        );
    }
}
