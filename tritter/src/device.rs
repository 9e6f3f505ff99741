//! Device selection at run time: `cpu` (Flex), `cuda`, `wgpu`.

use anyhow::Result;
use std::fmt;
use tritter_kernels::TritterBackend;

/// Work that runs on whichever backend the device selects.
pub trait BackendJob {
    type Output;
    fn run<B: TritterBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Checks that `kind` is usable here, then runs `job` on its backend. GPU runtimes report
/// a missing or failing device by panicking; that becomes an error naming the device.
pub fn run_on<J: BackendJob>(kind: DeviceKind, job: J) -> Result<J::Output> {
    kind.check_available()?;
    match kind {
        DeviceKind::Cpu => job.run::<burn::backend::Flex>(Default::default()),
        DeviceKind::Wgpu => {
            catch_backend_panic(kind, || job.run::<burn::backend::Wgpu>(Default::default()))
        }
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            catch_backend_panic(kind, || job.run::<burn::backend::Cuda>(Default::default()))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => Err(DeviceError::CudaNotBuilt.into()),
    }
}

fn catch_backend_panic<T>(device: DeviceKind, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown error");
        anyhow::bail!("--device {device}: the backend failed: {message}")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Wgpu,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`; expected cpu, cuda or wgpu")]
    Unknown(String),
    #[error("--device cuda: this binary was built without the `cuda` feature")]
    CudaNotBuilt,
    #[error("--device cuda: no NVIDIA driver found on this machine ({0}); use --device cpu")]
    NoCudaDriver(String),
}

impl DeviceKind {
    pub fn parse(name: &str) -> Result<Self, DeviceError> {
        match name.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "wgpu" | "vulkan" => Ok(Self::Wgpu),
            _ => Err(DeviceError::Unknown(name.to_string())),
        }
    }

    /// Checks, before any allocation, that the device can be used here.
    pub fn check_available(self) -> Result<(), DeviceError> {
        match self {
            Self::Cuda => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::CudaNotBuilt);
                }
                cuda_driver_present()
            }
            Self::Cpu | Self::Wgpu => Ok(()),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
        })
    }
}

/// The CUDA backend loads the driver library at run time; look for it the same way.
fn cuda_driver_present() -> Result<(), DeviceError> {
    let mut last = String::new();
    for name in ["libcuda.so.1", "libcuda.so", "nvcuda.dll"] {
        // SAFETY: loading the NVIDIA driver library runs only its initialisers.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(DeviceError::NoCudaDriver(last))
}
