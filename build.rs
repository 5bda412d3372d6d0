//! Makes the `rebeld` binaries find libtorch on their own and keeps CUDA reachable.
//!
//! torch-sys reports the libtorch library folder it linked against (`links = "tch"`), which
//! Cargo hands to us as `DEP_TCH_LIBTORCH_LIB`. Two things follow from it:
//! - an RUNPATH entry, so the binary runs without `LD_LIBRARY_PATH`;
//! - `libtorch_cuda` linked with `--no-as-needed`. Nothing in Rust references its symbols
//!   directly: its kernels register themselves when the library loads. With the linker's
//!   default `--as-needed` it would be dropped, and libtorch would silently report no CUDA;
//! - `csrc/cuda_memory.cpp`, the CUDA caching allocator's byte counts behind a C function
//!   (it answers "no allocator" in a libtorch built without CUDA).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");

    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; no RUNPATH set");
        return;
    };

    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    export_libtorch_version(Path::new(&lib_dir));
    compile_cuda_memory_shim(Path::new(&lib_dir));

    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib_dir}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    } else {
        println!("cargo:warning=no libtorch_cuda.so in {lib_dir}: this build can only use the CPU");
    }
}

/// Reads the version of the libtorch we link from the wheel's `version.py` (one folder above
/// `lib/`), so `rebeld version` reports the library the RUNPATH points at.
fn export_libtorch_version(lib_dir: &Path) {
    let version_file = lib_dir.join("../version.py");
    println!("cargo:rerun-if-changed={}", version_file.display());

    let version = std::fs::read_to_string(&version_file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("__version__ = "))
                .map(|quoted| quoted.trim().trim_matches(['\'', '"']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=REBELD_LIBTORCH_VERSION={version}");
}

/// Compiles `csrc/cuda_memory.cpp` against the libtorch headers beside `lib_dir`. It needs
/// only libc10, which torch-sys links already.
fn compile_cuda_memory_shim(lib_dir: &Path) {
    const SHIM: &str = "csrc/cuda_memory.cpp";
    println!("cargo:rerun-if-changed={SHIM}");

    cc::Build::new()
        .cpp(true)
        .file(SHIM)
        .include(lib_dir.join("../include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("rebeld_cuda_memory");
}
