//! The targets, one per parser of untrusted input.

mod cli;
mod http;
mod region;
mod state_json;
mod virtio_blk;
mod vm_config;

use crate::Target;

/// Every target's name, in the order the suite runs them.
pub const NAMES: [&str; 6] = [
    "http",
    "vm_config",
    "cli",
    "region",
    "state_json",
    "virtio_blk",
];

/// A scratch directory for a target's files, on tmpfs when there is one: a target that syncs
/// (a FLUSH request, a region commit) should not wait for a disk.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
}

/// The target called `name`.
pub fn by_name(name: &str) -> anyhow::Result<Box<dyn Target>> {
    Ok(match name {
        "http" => Box::new(http::HttpTarget),
        "vm_config" => Box::new(vm_config::VmConfigTarget),
        "cli" => Box::new(cli::CliTarget),
        "region" => Box::new(region::RegionTarget::new()?),
        "state_json" => Box::new(state_json::StateJsonTarget),
        "virtio_blk" => Box::new(virtio_blk::VirtioBlkTarget::new()?),
        other => anyhow::bail!("unknown target {other:?} (targets: {})", NAMES.join(", ")),
    })
}
