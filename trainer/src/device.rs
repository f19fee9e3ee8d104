//! Which device the models run on: the `--device cpu|cuda[:N]` flag of the binaries.
//!
//! Kept separate from candle's `Device` so the flag parses (and `--help` shows it) in every
//! build, and asking for CUDA in a CPU-only build is a clear error that says how to get a
//! CUDA build rather than candle's generic "not compiled with cuda support".

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// Whether this build has CUDA support (the `cuda` cargo feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// The message for a CUDA request in a build without the `cuda` feature.
pub const NO_CUDA_BUILD: &str =
    "built without CUDA support: rebuild with --features cuda (scripts/cuda-build.sh)";

/// A device requested on the command line. Default: CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl DeviceChoice {
    /// Opens the device. CUDA fails with [`NO_CUDA_BUILD`] in a CPU-only build, and with the
    /// driver's reason (no GPU, bad ordinal, driver too old) in a CUDA build.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(_) if !CUDA_BUILD => Err(Error::Invalid(NO_CUDA_BUILD.into())),
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                // The driver's reason only: candle appends a backtrace when RUST_BACKTRACE is set.
                let e = e.to_string();
                let e = e.lines().next().unwrap_or_default();
                Error::Invalid(format!(
                    "cannot open CUDA device {n}: {e} (is there a GPU and an NVIDIA driver \
                     for CUDA 13? `nvidia-smi` lists them; use --device cpu otherwise)"
                ))
            }),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!(
                    "unknown device '{s}': expected cpu, cuda or cuda:N (N = GPU ordinal)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_cuda_and_ordinals() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!(DeviceChoice::default(), DeviceChoice::Cpu);
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        assert_eq!(
            "cuda:2".parse::<DeviceChoice>().unwrap().to_string(),
            "cuda:2"
        );
    }

    #[test]
    fn cpu_always_opens_and_cuda_needs_a_cuda_build() {
        assert!(DeviceChoice::Cpu.device().unwrap().is_cpu());
        let r = DeviceChoice::Cuda(0).device();
        if CUDA_BUILD {
            // With a GPU this opens it; without one the error names the device.
            if let Err(e) = r {
                assert!(e.to_string().contains("cannot open CUDA device 0"), "{e}");
            }
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(NO_CUDA_BUILD), "{e}");
        }
    }
}
