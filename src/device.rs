//! Choosing where tensors live.

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
    fn probe_agrees_with_libtorch() {
        let inventory = DeviceInventory::probe();
        assert_eq!(inventory.cuda_available, Cuda::is_available());
    }
}
