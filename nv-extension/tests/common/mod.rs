//! Pieces shared by the integration tests of this crate.

#![allow(dead_code)] // each test binary uses a different subset

pub mod crash_model;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use nv_extension::{
    save_vm, HostError, NvHost, OpenOptions, Region, SaveReport, ShutdownKind, VmHandle,
};
use vm_memory::VolatileSlice;

/// Default layout, created when missing: a plain-file region as the VMM makes one.
pub fn create_options() -> OpenOptions {
    OpenOptions {
        create_if_missing: true,
        ..OpenOptions::default()
    }
}

/// A new plain-file region `name` in a fresh temporary directory, which is deleted when the
/// returned directory is dropped.
pub fn new_region(name: &str) -> (tempfile::TempDir, PathBuf, Region) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let region = Region::open(&path, &create_options()).unwrap();
    (dir, path, region)
}

/// A host with nothing to pause or flush whose volatile state is a fixed blob chosen by the test.
pub struct BlobHost(pub Vec<u8>);

impl NvHost for BlobHost {
    fn pause_vcpus(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn quiesce_devices(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
        Vec::new()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(self.0.clone())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn write_protect_memory(&mut self) -> Result<(), HostError> {
        Ok(())
    }
}

/// Saves `blob` as the VM's volatile state through the coordinator, with a generous deadline.
pub fn save_blob(
    handle: &mut VmHandle,
    blob: &[u8],
    kind: ShutdownKind,
) -> nv_extension::Result<SaveReport> {
    save_vm(
        handle,
        &mut BlobHost(blob.to_vec()),
        kind,
        Duration::from_secs(1),
    )
}

// ---- multi-process tests: the test binary re-runs itself as a child ----

/// Tells a child run of a test binary which region to work on.
pub const CHILD_ENV: &str = "NV_TEST_CHILD_REGION";

/// Runs `test` (an ignored test of the calling binary) as a child process working on `region`,
/// with `extra_env`; stdin and stdout piped, no core dump when it aborts.
pub fn spawn_child(test: &str, region: &Path, extra_env: &[(&str, &str)]) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, region)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in extra_env {
        command.env(key, value);
    }
    // Injected power failures abort(): no core dumps for them.
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        command.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    command.spawn().unwrap()
}

/// In a child started by [`spawn_child`], the region it works on.
pub fn child_region() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}
