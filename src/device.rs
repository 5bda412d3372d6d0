//! Choosing where tensors live.

use std::ffi::c_int;

use tch::{Cuda, Device};

use crate::config::DeviceSetting;

/// The configured device does not exist on this host.
#[derive(Debug, thiserror::Error)]
#[error("runtime.device = \"{setting}\" but libtorch sees {available} CUDA device(s)")]
pub struct DeviceUnavailable {
    setting: DeviceSetting,
    available: usize,
}

/// What libtorch can see on this host.
#[derive(Clone, Copy, Debug)]
pub struct DeviceInventory {
    /// Whether CUDA is usable.
    pub cuda_available: bool,
    /// Number of CUDA devices.
    pub cuda_devices: usize,
}

impl DeviceInventory {
    /// Asks libtorch.
    pub fn probe() -> Self {
        let cuda_devices = Cuda::device_count().max(0) as usize;
        Self {
            cuda_available: Cuda::is_available() && cuda_devices > 0,
            cuda_devices,
        }
    }

    /// Resolves a setting: `auto` takes the first GPU when there is one.
    pub fn resolve(&self, setting: DeviceSetting) -> Result<Device, DeviceUnavailable> {
        match setting {
            DeviceSetting::Cpu => Ok(Device::Cpu),
            DeviceSetting::Auto if self.cuda_available => Ok(Device::Cuda(0)),
            DeviceSetting::Auto => Ok(Device::Cpu),
            DeviceSetting::Cuda(index) if self.cuda_available && index < self.cuda_devices => {
                Ok(Device::Cuda(index))
            }
            DeviceSetting::Cuda(_) => Err(DeviceUnavailable {
                setting,
                available: self.cuda_devices,
            }),
        }
    }
}

/// What the CUDA caching allocator holds on one device, as `torch.cuda.memory_allocated()` and
/// `torch.cuda.memory_reserved()` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaMemory {
    /// Bytes in live tensors.
    pub allocated_bytes: u64,
    /// Bytes taken from the driver: live tensors plus the allocator's cache.
    pub reserved_bytes: u64,
}

extern "C" {
    /// `csrc/cuda_memory.cpp`: 0 and both counts written, or -1 and nothing written.
    fn rebeld_cuda_memory(device: c_int, allocated: *mut i64, reserved: *mut i64) -> c_int;
}

/// The caching allocator's counts on CUDA device `index`; `None` without CUDA, or before
/// anything has been allocated on a GPU, or for a device that does not exist.
pub fn cuda_memory(index: usize) -> Option<CudaMemory> {
    let device = c_int::try_from(index).ok()?;
    let (mut allocated, mut reserved) = (0_i64, 0_i64);
    // SAFETY: both pointers are to live, writable locals for the whole call; the C++ side
    // catches every exception and writes only through them.
    let status = unsafe { rebeld_cuda_memory(device, &mut allocated, &mut reserved) };
    (status == 0).then(|| CudaMemory {
        allocated_bytes: u64::try_from(allocated).unwrap_or(0),
        reserved_bytes: u64::try_from(reserved).unwrap_or(0),
    })
}

/// A short name for logs and metrics labels: `cpu` or `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_GPU: DeviceInventory = DeviceInventory {
        cuda_available: false,
        cuda_devices: 0,
    };
    const TWO_GPUS: DeviceInventory = DeviceInventory {
        cuda_available: true,
        cuda_devices: 2,
    };

    #[test]
    fn auto_prefers_cuda_and_falls_back_to_cpu() {
        assert_eq!(NO_GPU.resolve(DeviceSetting::Auto).ok(), Some(Device::Cpu));
        assert_eq!(
            TWO_GPUS.resolve(DeviceSetting::Auto).ok(),
            Some(Device::Cuda(0))
        );
    }

    #[test]
    fn explicit_cuda_index_must_exist() {
        assert_eq!(
            TWO_GPUS.resolve(DeviceSetting::Cuda(1)).ok(),
            Some(Device::Cuda(1))
        );

        let error = TWO_GPUS
            .resolve(DeviceSetting::Cuda(2))
            .expect_err("no third GPU");
        assert_eq!(
            error.to_string(),
            "runtime.device = \"cuda:2\" but libtorch sees 2 CUDA device(s)"
        );
        assert!(NO_GPU.resolve(DeviceSetting::Cuda(0)).is_err());
    }

    #[test]
    fn cuda_memory_follows_a_tensor_on_the_gpu() {
        if !Cuda::is_available() {
            assert_eq!(cuda_memory(0), None, "no GPU: nothing to read");
            return;
        }
        let bytes = 64 << 20;
        let before = touch_and_read(0);
        let tensor = tch::Tensor::zeros([bytes / 4], (tch::Kind::Float, Device::Cuda(0)));
        let during = touch_and_read(0);
        drop(tensor);
        let after = touch_and_read(0);

        assert_eq!(
            during.allocated_bytes - before.allocated_bytes,
            bytes as u64
        );
        assert!(during.reserved_bytes >= during.allocated_bytes);
        assert_eq!(after.allocated_bytes, before.allocated_bytes);
        assert_eq!(
            after.reserved_bytes, during.reserved_bytes,
            "freed memory stays cached"
        );
    }

    /// Makes sure the allocator has initialised device `index`, then reads it.
    fn touch_and_read(index: usize) -> CudaMemory {
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, Device::Cuda(index)));
        cuda_memory(index).expect("the allocator answers once the device is in use")
    }

    #[test]
    fn probe_agrees_with_libtorch() {
        let inventory = DeviceInventory::probe();
        assert_eq!(inventory.cuda_available, Cuda::is_available());
    }
}
