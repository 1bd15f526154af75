//! What every measurement needs from the host: the binaries under test, the guest image,
//! the TSC rate the guest should assume, and scratch directories on tmpfs and on disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::binaries::{cargo_target_dir, workspace_root};

use crate::error::{BenchError, Result};

/// Paths of the programs under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub cloud_hypervisor: PathBuf,
    pub ch_remote: PathBuf,
    /// This package's `nv-floor` helper (A-floor).
    pub nv_floor: PathBuf,
    /// This package's `nv-track` helper (the checkpoint section's write-tracking floor).
    pub nv_track: PathBuf,
    /// Our vhost-user-blk backend (H), always this workspace's.
    pub nv_vhost_user_blk: PathBuf,
    /// Our vhost-user-net backend (H, network), always this workspace's.
    pub nv_vhost_user_net: PathBuf,
}

impl Binaries {
    /// Uses the given paths, or builds `cloud-hypervisor` and `ch-remote` with cargo in the
    /// profile this program was built in, so the VMM measured matches the sources.
    pub fn locate(cloud_hypervisor: Option<PathBuf>, ch_remote: Option<PathBuf>) -> Result<Self> {
        let workspace = workspace_root();
        let release = !cfg!(debug_assertions);
        let profile_dir = cargo_target_dir().join(if release { "release" } else { "debug" });
        let build = |package: &str, given: Option<PathBuf>| -> Result<PathBuf> {
            if let Some(path) = given {
                return Ok(path);
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut command = Command::new(cargo);
            command
                .current_dir(&workspace)
                .args(["build", "--quiet", "-p", package]);
            if release {
                command.arg("--release");
            }
            let status = command
                .status()
                .map_err(|e| BenchError::io(format!("running cargo build -p {package}"), e))?;
            if !status.success() {
                return Err(BenchError::CargoBuild {
                    package: package.to_string(),
                    status,
                });
            }
            Ok(profile_dir.join(package))
        };
        Ok(Self {
            cloud_hypervisor: build("cloud-hypervisor", cloud_hypervisor)?,
            ch_remote: build("ch-remote", ch_remote)?,
            // Building the package builds its helper binary with it.
            nv_floor: build("nv-bench", None)?.with_file_name("nv-floor"),
            nv_track: profile_dir.join("nv-track"),
            nv_vhost_user_blk: build("nv-vhost-user-blk", None)?,
            nv_vhost_user_net: build("nv-vhost-user-net", None)?,
        })
    }
}

/// A test guest's image (`kvstore`, `counter`), built from `integration-tests/guests/` if out
/// of date.
pub fn guest_image(name: &str) -> Result<PathBuf> {
    integration_tests::guests::guest_image(name).map_err(|source| BenchError::GuestBuild {
        guest: name.into(),
        source,
    })
}

/// The host TSC rate KVM gives a guest (KVM_GET_TSC_KHZ on a scratch vCPU). The guests pace
/// their ~100 ms progress lines by it; it is not used for any reported duration.
pub fn guest_tsc_khz() -> Result<u32> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    Ok(vcpu.get_tsc_khz()?)
}

/// The file system type `path` lives on, from /proc/mounts (longest mount-point prefix).
pub fn file_system_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount_point)
                .then(|| (mount_point.len(), kind.to_string()))
        })
        .max_by_key(|(length, _)| *length)
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "unknown".into())
}

/// A scratch directory removed (with everything in it) when dropped.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<parent>/nv-bench-<pid>-<label>`.
    pub fn create(parent: &Path, label: &str) -> Result<Self> {
        let path = parent.join(format!("nv-bench-{}-{label}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .map_err(|e| BenchError::io(format!("clearing {}", path.display()), e))?;
        }
        std::fs::create_dir_all(&path)
            .map_err(|e| BenchError::io(format!("creating {}", path.display()), e))?;
        Ok(Self { path })
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Guest RAM files are gigabytes on tmpfs: never leave them behind.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Creates a sparse file of `bytes` (a disk image or an empty log disk).
pub fn create_sparse_file(path: &Path, bytes: u64) -> Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| BenchError::io(format!("creating {}", path.display()), e))?;
    file.set_len(bytes)
        .map_err(|e| BenchError::io(format!("sizing {}", path.display()), e))
}
