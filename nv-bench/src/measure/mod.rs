//! The four measurements of issue 6, one module each, over a shared [`Bench`] context.

pub mod checkpoint;
pub mod floor;
pub mod memory_scale;
pub mod net_outage;
pub mod overhead;
pub mod power_fail;
pub mod region_power_fail;
pub mod service;
pub mod snapshot;
pub mod stale_state;
pub mod swap;
pub mod vhost_user;

use std::path::PathBuf;
use std::time::Duration;

use crate::environment::{Binaries, ScratchDir};
use crate::error::Result;
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::output::Summary;
use crate::profile::{keys_label, Profile};
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

/// How `each_variant_repeatedly` announces a step and names a variant that could not be
/// measured: measurement `letter` at `keys` keys, each repetition called `repetition` (from 1)
/// and followed by `detail`.
pub struct StepNames<'a> {
    pub letter: &'a str,
    pub keys: u64,
    pub repetition: &'a str,
    pub detail: &'a str,
}

impl StepNames<'_> {
    /// `D 100k keys, anonymous, repetition 1`.
    fn step(&self, variant: &str, repetition: usize) -> String {
        format!(
            "{} {} keys, {variant}, {} {}{}",
            self.letter,
            keys_label(self.keys),
            self.repetition,
            repetition + 1,
            self.detail
        )
    }

    /// `D anonymous at 100k keys`.
    fn what(&self, variant: &str) -> String {
        format!(
            "{} {variant} at {} keys",
            self.letter,
            keys_label(self.keys)
        )
    }
}

/// Measures every variant `repetitions` times: repetitions outside, variants inside, so that load
/// from the rest of the machine drifts under every variant alike. Each step is announced as
/// `names` says with the variant's `label`; a variant that fails once is reported as not
/// measured (with the error) and not run again. `measure` gets the bench, the variant and the
/// repetition (from 0); the results come back per variant, in `variants`' order.
pub fn each_variant_repeatedly<V: Copy + PartialEq, R>(
    bench: &mut Bench,
    variants: &[V],
    repetitions: usize,
    names: StepNames,
    label: impl Fn(V) -> &'static str,
    mut measure: impl FnMut(&mut Bench, V, usize) -> Result<R>,
) -> Vec<(V, Vec<R>)> {
    let mut results: Vec<(V, Vec<R>)> = variants.iter().map(|&v| (v, Vec::new())).collect();
    let mut failed: Vec<V> = Vec::new();
    for repetition in 0..repetitions {
        for (variant, done) in results.iter_mut() {
            if failed.contains(variant) {
                continue;
            }
            bench
                .summary
                .progress(names.step(label(*variant), repetition));
            match measure(bench, *variant, repetition) {
                Ok(result) => done.push(result),
                Err(error) => {
                    bench
                        .summary
                        .not_measured(&names.what(label(*variant)), &error.to_string());
                    failed.push(*variant);
                }
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_read_as_the_summary_prints_them() {
        let names = StepNames {
            letter: "C",
            keys: 100_000,
            repetition: "run",
            detail: ": load, failure, recovery",
        };
        assert_eq!(
            names.step("copy snapshot/restore", 0),
            "C 100k keys, copy snapshot/restore, run 1: load, failure, recovery"
        );
        assert_eq!(
            names.what("copy snapshot/restore"),
            "C copy snapshot/restore at 100k keys"
        );
    }
}
