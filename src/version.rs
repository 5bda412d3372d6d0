//! What this binary is built from and what it can see.

use std::fmt;

use crate::device::DeviceInventory;

/// rebeld's own version.
pub const REBELD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The libtorch version the binary links (read from the wheel at build time; the RUNPATH
/// points at the same library).
pub const LIBTORCH_VERSION: &str = env!("REBELD_LIBTORCH_VERSION");

/// Versions and devices, as `rebeld version` prints them.
#[derive(Clone, Debug)]
pub struct VersionReport {
    /// rebeld.
    pub rebeld: &'static str,
    /// libtorch, without the `+cu130` local tag.
    pub libtorch: String,
    /// The libtorch build tag (`cu130`, `cpu`), if any.
    pub libtorch_build: Option<String>,
    /// The bundled librdkafka.
    pub librdkafka: String,
    /// CUDA as libtorch sees it.
    pub devices: DeviceInventory,
}

impl VersionReport {
    /// Collects the report (asks libtorch about CUDA).
    pub fn collect() -> Self {
        let (libtorch, build) = match LIBTORCH_VERSION.split_once('+') {
            Some((version, tag)) => (version.to_owned(), Some(tag.to_owned())),
            None => (LIBTORCH_VERSION.to_owned(), None),
        };
        Self {
            rebeld: REBELD_VERSION,
            libtorch,
            libtorch_build: build,
            librdkafka: rdkafka::util::get_rdkafka_version().1,
            devices: DeviceInventory::probe(),
        }
    }
}

impl fmt::Display for VersionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "rebeld {}", self.rebeld)?;
        match &self.libtorch_build {
            Some(tag) => writeln!(f, "libtorch {} ({tag})", self.libtorch)?,
            None => writeln!(f, "libtorch {}", self.libtorch)?,
        }
        writeln!(f, "librdkafka {}", self.librdkafka)?;
        writeln!(f, "cuda available: {}", self.devices.cuda_available)?;
        write!(f, "cuda devices: {}", self.devices.cuda_devices)
    }
}
