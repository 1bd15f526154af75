//! The NV-Hypervisor VMM library, built on the rust-vmm crates. It knows nothing of the NV region
//! layout: it reaches NV only through the `nv-extension` coordinator and its host trait.

pub mod config;
mod error;
pub mod event_monitor;
pub mod option_parser;
pub mod seccomp_filters;

pub use error::Error;

/// Runs one VMM process as the command line asked and returns its exit code: 0 when the VM ended
/// cleanly, 1 when it failed to start or failed while running.
pub fn run(launch: config::VmmLaunch) -> Result<i32, Error> {
    let _vm_config = launch.vm.ok_or(Error::NoVmConfig)?;
    Err(Error::InvalidVmState("not yet bootable"))
}
