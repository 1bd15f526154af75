//! The four measurements of issue 6, one module each, over a shared [`Bench`] context.

pub mod overhead;
pub mod power_fail;
pub mod service;
pub mod snapshot;
pub mod stale_state;

use std::path::PathBuf;
use std::time::Duration;

use crate::environment::{Binaries, ScratchDir};
use crate::error::Result;
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::output::Summary;
use crate::profile::Profile;
use crate::running_vm::RunningVm;

/// Bound for a guest to boot and print `kvstore: serving` (ring-0 boot is emulated here and
/// the table's first touch costs ~21 us a page: ~22 s for 4 GiB).
pub const SERVING_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound for one progress line (they come every ~100 ms).
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every measurement uses.
pub struct Bench {
    pub binaries: Binaries,
    pub kvstore_image: PathBuf,
    pub counter_image: PathBuf,
    pub tsc_khz: u32,
    pub profile: Profile,
    pub out_dir: PathBuf,
    /// Scratch space on tmpfs: NV regions there behave like NVDIMM (they survive the VMM).
    pub tmpfs: ScratchDir,
    /// Scratch space on a disk file system: log disks, snapshots, disk-file regions.
    pub disk: ScratchDir,
    pub summary: Summary,
    /// Appended to every VMM command line (`--vmm-arg`), e.g. `--seccomp false`.
    pub vmm_arguments: Vec<String>,
}

impl Bench {
    /// The kvstore guest with `keys` keys in `ram_bytes` of RAM, printing a progress line
    /// every `period_ms`.
    pub fn kvstore(
        &self,
        keys: u64,
        ram_bytes: u64,
        period_ms: u32,
        log_disk: Option<PathBuf>,
    ) -> TestGuest {
        TestGuest {
            image: self.kvstore_image.clone(),
            parameters: format!("keys={keys}"),
            ram_bytes,
            tsc_khz: self.tsc_khz,
            period_ms,
            log_disk,
        }
    }

    /// Boots `guest` on `backing` and waits for `kvstore: serving`.
    pub fn boot_serving(
        &self,
        guest: TestGuest,
        backing: MemoryBacking,
        tag: &str,
        api_socket: Option<PathBuf>,
    ) -> Result<RunningVm> {
        let serial = self.disk.join(&format!("{tag}.serial"));
        let output = self.disk.join(&format!("{tag}.vmm"));
        let launch = Launch::Boot { guest, backing };
        let mut vm = RunningVm::start(
            &self.binaries.cloud_hypervisor,
            &launch,
            &serial,
            api_socket.as_deref(),
            &output,
            &self.vmm_arguments,
        )?;
        vm.wait_for_lines("kvstore: serving", 1, SERVING_TIMEOUT)?;
        Ok(vm)
    }
}
