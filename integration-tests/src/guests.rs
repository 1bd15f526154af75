//! Builds the freestanding test guests in `integration-tests/guests/` with gcc.
//!
//! Guests are compiled at test time (no build script) into `<target dir>/guests/<name>`.
//! An image is rebuilt only when a guest source or the compiler command changed, and a build
//! writes to a unique temporary name and renames it into place, so several test processes
//! or threads may ask for the same guest at once.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Every guest `guest_image` knows how to build.
pub const GUEST_NAMES: [&str; 12] = [
    "counter", "blkcheck", "kvstore", "devcheck", "intcheck", "smpcheck", "pcicheck", "conrng",
    "pcimsix", "netkv", "hpcheck", "fscheck",
];

/// Environment variable naming the C compiler (default `gcc`).
pub const COMPILER_ENV: &str = "NV_GUEST_CC";

/// Sources linked into every guest: boot stub, ring-0 setup and the ring-3 runtime.
const COMMON_SOURCES: [&str; 9] = [
    "boot.S",
    "kernel.c",
    "console.c",
    "params.c",
    "clock.c",
    "runtime.c",
    "virtio_blk.c",
    "virtio_pci.c",
    "pci.c",
];

/// Sources only some guests link: each brings buffers or stacks the others would carry as
/// dead weight (and move the first free RAM address they report).
fn extra_sources(name: &str) -> &'static [&'static str] {
    match name {
        "blkcheck" => &["block_check.c"],
        "smpcheck" => &["smp.c"],
        "pcimsix" => &["block_check.c", "smp.c"],
        _ => &[],
    }
}
const LINKER_SCRIPT: &str = "guest.ld";

/// Flags from DEVELOPERS.md, plus what keeps the image free of unwind tables, stack
/// protector calls, CET instructions and compiler-generated calls into itself.
const COMPILER_FLAGS: [&str; 17] = [
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
];

/// Why a guest image could not be produced.
#[derive(Debug)]
pub enum GuestBuildError {
    /// The name is not one of [`GUEST_NAMES`].
    UnknownGuest(String),
    /// The C compiler could not be started (usually: not installed).
    CompilerMissing { compiler: String, source: io::Error },
    /// The compiler ran and failed; `stderr` holds its diagnostics.
    CompilerFailed {
        guest: String,
        status: ExitStatus,
        stderr: String,
    },
    /// A file-system operation on the sources or the output directory failed.
    Io { context: String, source: io::Error },
}

impl fmt::Display for GuestBuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownGuest(name) => write!(
                f,
                "unknown test guest {name:?} (known: {})",
                GUEST_NAMES.join(", ")
            ),
            Self::CompilerMissing { compiler, source } => write!(
                f,
                "cannot run the C compiler {compiler:?} to build the test guests: {source} \
                 (install gcc, e.g. `apt-get install gcc`, or set {COMPILER_ENV})"
            ),
            Self::CompilerFailed {
                guest,
                status,
                stderr,
            } => write!(
                f,
                "building test guest {guest:?} failed ({status}):\n{stderr}"
            ),
            Self::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for GuestBuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::CompilerMissing { source, .. } | Self::Io { source, .. } => Some(source),
            Self::UnknownGuest(_) | Self::CompilerFailed { .. } => None,
        }
    }
}

/// Returns the path of the built ELF image of guest `name`, building it first if it is
/// missing or out of date.
pub fn guest_image(name: &str) -> Result<PathBuf, GuestBuildError> {
    GuestBuilder::from_environment().image(name)
}

/// Directory holding the guest sources.
pub fn guest_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guests")
}

/// Directory the images are built into: `$CARGO_TARGET_DIR/guests` (a relative
/// `CARGO_TARGET_DIR` is taken from the workspace root, as cargo run there would), else
/// the workspace's `target/guests`.
pub fn guest_output_dir() -> PathBuf {
    crate::binaries::cargo_target_dir().join("guests")
}

/// Compiler, source and output locations for building guests.
#[derive(Debug, Clone)]
struct GuestBuilder {
    compiler: OsString,
    source_dir: PathBuf,
    output_dir: PathBuf,
}

impl GuestBuilder {
    fn from_environment() -> Self {
        Self {
            compiler: std::env::var_os(COMPILER_ENV)
                .filter(|compiler| !compiler.is_empty())
                .unwrap_or_else(|| OsString::from("gcc")),
            source_dir: guest_source_dir(),
            output_dir: guest_output_dir(),
        }
    }

    fn image(&self, name: &str) -> Result<PathBuf, GuestBuildError> {
        if !GUEST_NAMES.contains(&name) {
            return Err(GuestBuildError::UnknownGuest(name.to_string()));
        }
        let image = self.output_dir.join(name);
        let recipe_file = self.output_dir.join(format!("{name}.cmd"));
        let arguments = self.compiler_arguments(name);
        let recipe = self.recipe_text(&arguments);

        if self.is_up_to_date(&image, &recipe_file, &recipe)? {
            return Ok(image);
        }
        fs::create_dir_all(&self.output_dir).map_err(|source| GuestBuildError::Io {
            context: format!("creating {}", self.output_dir.display()),
            source,
        })?;
        let temporary = unique_temporary_path(&self.output_dir, name);
        let result = self.compile(name, &arguments, &temporary).and_then(|()| {
            // The recipe is written first: a reader that sees the new image also sees the
            // recipe that produced it, and a stale recipe only causes one extra rebuild.
            write_atomically(&recipe_file, recipe.as_bytes())?;
            fs::rename(&temporary, &image).map_err(|source| GuestBuildError::Io {
                context: format!("moving the built guest to {}", image.display()),
                source,
            })
        });
        if result.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        result.map(|()| image)
    }

    fn compiler_arguments(&self, name: &str) -> Vec<OsString> {
        let mut arguments: Vec<OsString> = COMPILER_FLAGS.iter().map(OsString::from).collect();
        arguments.push("-I".into());
        arguments.push(self.source_dir.clone().into_os_string());
        arguments.push("-T".into());
        arguments.push(self.source_dir.join(LINKER_SCRIPT).into_os_string());
        for source in COMMON_SOURCES {
            arguments.push(self.source_dir.join(source).into_os_string());
        }
        for source in extra_sources(name) {
            arguments.push(self.source_dir.join(source).into_os_string());
        }
        arguments.push(self.source_dir.join(format!("{name}.c")).into_os_string());
        arguments
    }

    fn recipe_text(&self, arguments: &[OsString]) -> String {
        let mut recipe = self.compiler.to_string_lossy().into_owned();
        for argument in arguments {
            recipe.push(' ');
            recipe.push_str(&argument.to_string_lossy());
        }
        recipe.push('\n');
        recipe
    }

    /// Up to date: the image exists, was built by the same command, and is newer than
    /// every file in the source directory (headers included).
    fn is_up_to_date(
        &self,
        image: &Path,
        recipe_file: &Path,
        recipe: &str,
    ) -> Result<bool, GuestBuildError> {
        let Ok(image_time) = fs::metadata(image).and_then(|meta| meta.modified()) else {
            return Ok(false);
        };
        match fs::read_to_string(recipe_file) {
            Ok(previous) if previous == recipe => {}
            _ => return Ok(false),
        }
        Ok(newest_source_time(&self.source_dir)? <= image_time)
    }

    fn compile(
        &self,
        name: &str,
        arguments: &[OsString],
        output: &Path,
    ) -> Result<(), GuestBuildError> {
        let result = Command::new(&self.compiler)
            .args(arguments)
            .arg("-o")
            .arg(output)
            .current_dir(&self.source_dir)
            .output()
            .map_err(|source| GuestBuildError::CompilerMissing {
                compiler: self.compiler.to_string_lossy().into_owned(),
                source,
            })?;
        if result.status.success() {
            Ok(())
        } else {
            Err(GuestBuildError::CompilerFailed {
                guest: name.to_string(),
                status: result.status,
                stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
            })
        }
    }
}

fn newest_source_time(source_dir: &Path) -> Result<SystemTime, GuestBuildError> {
    let io_error = |source| GuestBuildError::Io {
        context: format!("reading guest sources in {}", source_dir.display()),
        source,
    };
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(source_dir).map_err(io_error)? {
        let metadata = entry.and_then(|entry| entry.metadata()).map_err(io_error)?;
        if metadata.is_file() {
            newest = newest.max(metadata.modified().map_err(io_error)?);
        }
    }
    Ok(newest)
}

/// A name no other process or thread uses: pid plus a per-process counter.
fn unique_temporary_path(dir: &Path, name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let serial = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp-{}-{serial}", std::process::id()))
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), GuestBuildError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = unique_temporary_path(dir, &file_name);
    let result = fs::write(&temporary, contents).and_then(|()| fs::rename(&temporary, path));
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result.map_err(|source| GuestBuildError::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// Size of one `blkcheck` block on the disk.
pub const BLKCHECK_BLOCK_SIZE: usize = 4096;
const BLKCHECK_MAGIC: u64 = 0x4b48_434b_4c42_564e; // "NVBLKCHK"
const BLKCHECK_PATTERN_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const BLKCHECK_HEADER_WORDS: usize = 4;

/// A disk written by `blkcheck` that does not hold what the guest promised.
#[derive(Debug)]
pub enum BlkcheckDiskError {
    /// The disk file could not be read.
    Io { path: PathBuf, source: io::Error },
    /// The disk is shorter than `blocks` x 4 KiB.
    TooSmall { bytes: u64, blocks: u64 },
    /// Block `index` is not the block the guest wrote (or an older one).
    BadBlock { index: u64, why: String },
}

impl fmt::Display for BlkcheckDiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "reading {}: {source}", path.display()),
            Self::TooSmall { bytes, blocks } => {
                write!(
                    f,
                    "disk has {bytes} bytes, blkcheck wrote {blocks} blocks of 4 KiB"
                )
            }
            Self::BadBlock { index, why } => write!(f, "blkcheck block {index}: {why}"),
        }
    }
}

impl std::error::Error for BlkcheckDiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::TooSmall { .. } | Self::BadBlock { .. } => None,
        }
    }
}

/// The bytes `blkcheck blocks=<blocks>` writes as block `index` in `round` (both from 0);
/// the format is described in `guests/README.md`.
pub fn blkcheck_block(blocks: u64, round: u64, index: u64) -> Vec<u8> {
    let seq = round * blocks + index + 1;
    let mut bytes = Vec::with_capacity(BLKCHECK_BLOCK_SIZE);
    for word in [BLKCHECK_MAGIC, seq, index, round] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    for k in BLKCHECK_HEADER_WORDS as u64..(BLKCHECK_BLOCK_SIZE / 8) as u64 {
        let word = seq.wrapping_mul(BLKCHECK_PATTERN_MULTIPLIER) ^ k;
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes
}

/// Checks a disk after `blkcheck blocks=<blocks>` printed `blkcheck: completed seq=<S>`
/// (after `done ok`, S is `rounds * blocks`): every block written with a seq <= S must be
/// on the disk intact, or replaced by a later round's intact block for the same index.
pub fn verify_blkcheck_disk(
    disk: &Path,
    blocks: u64,
    completed_seq: u64,
) -> Result<(), BlkcheckDiskError> {
    let bytes = fs::read(disk).map_err(|source| BlkcheckDiskError::Io {
        path: disk.to_path_buf(),
        source,
    })?;
    verify_blkcheck_bytes(&bytes, blocks, completed_seq)
}

fn verify_blkcheck_bytes(
    disk: &[u8],
    blocks: u64,
    completed_seq: u64,
) -> Result<(), BlkcheckDiskError> {
    let too_small = || BlkcheckDiskError::TooSmall {
        bytes: disk.len() as u64,
        blocks,
    };
    let needed = blocks
        .checked_mul(BLKCHECK_BLOCK_SIZE as u64)
        .ok_or_else(too_small)?;
    if (disk.len() as u64) < needed || blocks == 0 {
        return Err(too_small());
    }
    for (index, block) in (0..blocks).zip(disk.chunks_exact(BLKCHECK_BLOCK_SIZE)) {
        let bad = |why: String| BlkcheckDiskError::BadBlock { index, why };
        // The newest seq <= completed_seq written at this index, if any.
        let Some(required_round) = completed_seq.checked_sub(index + 1).map(|s| s / blocks) else {
            continue;
        };
        let word = |n: usize| read_u64(block, n * 8).unwrap_or_default();
        if word(0) != BLKCHECK_MAGIC {
            return Err(bad(format!("no blkcheck header (word 0 = {:#x})", word(0))));
        }
        let round = word(3);
        if word(2) != index {
            return Err(bad(format!("holds block index {}", word(2))));
        }
        if round < required_round {
            return Err(bad(format!(
                "holds round {round}, but round {required_round} was reported complete"
            )));
        }
        if block != blkcheck_block(blocks, round, index).as_slice() {
            return Err(bad(format!(
                "round {round} content differs from its pattern"
            )));
        }
    }
    Ok(())
}

/// Guest RAM [`pvh_entry_point`] loads an image into: the test guests load at 1 MiB and are far
/// smaller; the mapping is anonymous and only the pages the loader writes are touched.
const SCRATCH_RAM: usize = 64 << 20;

/// The 32-bit PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`) of an ELF image, found by the VMM's
/// own loader (`arch::load_kernel`, which reads the note with linux-loader) loading it into
/// scratch guest RAM. `None` if the image does not load as a PVH kernel: not a 64-bit x86_64
/// ELF, truncated, without the note, or larger than the scratch RAM.
pub fn pvh_entry_point(image: &[u8]) -> Option<u32> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), SCRATCH_RAM)]).ok()?;
    let entry = arch::load_kernel(&memory, &mut io::Cursor::new(image), "", None, None).ok()?;
    if entry.protocol != arch::BootProtocol::Pvh {
        return None;
    }
    u32::try_from(entry.entry.0).ok()
}

#[cfg(test)]
fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(offset..offset.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Executable PT_LOAD segments as (start, end) guest-physical ranges.
    fn executable_segments(image: &[u8]) -> Vec<(u64, u64)> {
        const PT_LOAD: u32 = 1;
        const PF_X: u32 = 1;
        let table = read_u64(image, 0x20).unwrap() as usize;
        let size = read_u16(image, 0x36).unwrap() as usize;
        let count = read_u16(image, 0x38).unwrap() as usize;
        (0..count)
            .map(|index| table + index * size)
            .filter(|&header| {
                read_u32(image, header) == Some(PT_LOAD)
                    && read_u32(image, header + 4).unwrap() & PF_X != 0
            })
            .map(|header| {
                let start = read_u64(image, header + 24).unwrap();
                (start, start + read_u64(image, header + 40).unwrap())
            })
            .collect()
    }

    fn builder_into(output_dir: &Path) -> GuestBuilder {
        GuestBuilder {
            output_dir: output_dir.to_path_buf(),
            ..GuestBuilder::from_environment()
        }
    }

    #[test]
    fn every_guest_builds_with_a_pvh_entry_in_its_code() {
        for name in GUEST_NAMES {
            let path = guest_image(name).unwrap_or_else(|error| panic!("{error}"));
            let image = fs::read(&path).unwrap();
            let entry = pvh_entry_point(&image)
                .unwrap_or_else(|| panic!("{name}: no PVH note in {}", path.display()));
            assert!(entry >= 0x10_0000, "{name}: entry {entry:#x} below 1 MiB");
            assert_eq!(
                u64::from(entry),
                read_u64(&image, 0x18).unwrap(),
                "{name}: PVH entry differs from the ELF entry"
            );
            assert!(
                executable_segments(&image)
                    .iter()
                    .any(|&(start, end)| (start..end).contains(&u64::from(entry))),
                "{name}: entry {entry:#x} is not in an executable segment"
            );
        }
    }

    #[test]
    fn unknown_guest_is_rejected_by_name() {
        let error = guest_image("no-such-guest").unwrap_err();
        assert!(matches!(error, GuestBuildError::UnknownGuest(_)));
        assert!(error.to_string().contains("no-such-guest"));
    }

    #[test]
    fn up_to_date_image_is_not_rebuilt_but_a_changed_recipe_is() {
        let output = tempfile::tempdir().unwrap();
        let builder = builder_into(output.path());
        let path = builder.image("counter").unwrap();
        let built_at = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(builder.image("counter").unwrap(), path);
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), built_at);

        fs::write(output.path().join("counter.cmd"), "something else\n").unwrap();
        builder.image("counter").unwrap();
        assert!(fs::metadata(&path).unwrap().modified().unwrap() > built_at);
    }

    #[test]
    fn concurrent_builds_of_one_guest_all_get_a_valid_image() {
        let output = tempfile::tempdir().unwrap();
        let builder = builder_into(output.path());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let builder = builder.clone();
                std::thread::spawn(move || builder.image("blkcheck"))
            })
            .collect();
        for thread in threads {
            let path = thread.join().unwrap().unwrap();
            assert!(pvh_entry_point(&fs::read(path).unwrap()).is_some());
        }
        let leftovers: Vec<_> = fs::read_dir(output.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn missing_compiler_is_a_clear_error() {
        let output = tempfile::tempdir().unwrap();
        let builder = GuestBuilder {
            compiler: OsString::from("/nonexistent/bin/gcc"),
            ..builder_into(output.path())
        };
        let error = builder.image("counter").unwrap_err();
        assert!(matches!(error, GuestBuildError::CompilerMissing { .. }));
        assert!(error.to_string().contains("/nonexistent/bin/gcc"));
    }

    /// The guests' time base must survive a TSC that jumps backwards (host reboot after
    /// a power failure) or forwards (restore), and a zero `tsc_khz=`. Its C code is
    /// compiled for the host against a scripted TSC and run here.
    #[test]
    fn guest_clock_survives_tsc_jumps_and_a_zero_rate() {
        let source = guest_source_dir();
        let output = tempfile::tempdir().unwrap();
        let binary = output.path().join("clock_test");
        let compiled = Command::new(GuestBuilder::from_environment().compiler)
            .args([
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-DGUEST_CLOCK_HOST_TEST",
                "-I",
            ])
            .arg(&source)
            .arg(source.join("host_tests").join("clock_test.c"))
            .arg(source.join("clock.c"))
            .arg("-o")
            .arg(&binary)
            .output()
            .unwrap();
        assert!(
            compiled.status.success(),
            "{}",
            String::from_utf8_lossy(&compiled.stderr)
        );
        let run = Command::new(&binary).output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }

    fn blkcheck_disk(blocks: u64, rounds_per_index: &[u64]) -> Vec<u8> {
        (0..blocks)
            .flat_map(|index| blkcheck_block(blocks, rounds_per_index[index as usize], index))
            .collect()
    }

    #[test]
    fn blkcheck_block_follows_the_documented_layout() {
        let block = blkcheck_block(256, 1, 3);
        assert_eq!(block.len(), BLKCHECK_BLOCK_SIZE);
        assert_eq!(&block[0..8], b"NVBLKCHK");
        assert_eq!(read_u64(&block, 8), Some(256 + 3 + 1));
        assert_eq!(read_u64(&block, 16), Some(3));
        assert_eq!(read_u64(&block, 24), Some(1));
        assert_eq!(
            read_u64(&block, 4 * 8),
            Some(260u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 4)
        );
    }

    #[test]
    fn blkcheck_verification_accepts_finished_and_partial_runs() {
        let done = blkcheck_disk(4, &[1, 1, 1, 1]);
        verify_blkcheck_bytes(&done, 4, 8).unwrap();
        // Interrupted in round 1 after seq 6 was reported: indices 0, 1 are in round 1,
        // 2 and 3 may still hold round 0 (and the disk may be larger than the run).
        let mut partial = blkcheck_disk(4, &[1, 1, 0, 0]);
        partial.extend_from_slice(&[0; BLKCHECK_BLOCK_SIZE]);
        verify_blkcheck_bytes(&partial, 4, 6).unwrap();
        // Nothing reported yet: any content is acceptable.
        verify_blkcheck_bytes(&[0; 4 * BLKCHECK_BLOCK_SIZE], 4, 0).unwrap();
    }

    #[test]
    fn blkcheck_verification_finds_lost_stale_and_corrupt_blocks() {
        let stale = blkcheck_disk(4, &[1, 0, 1, 1]);
        let error = verify_blkcheck_bytes(&stale, 4, 8).unwrap_err();
        assert!(
            matches!(error, BlkcheckDiskError::BadBlock { index: 1, .. }),
            "{error}"
        );

        let mut corrupt = blkcheck_disk(4, &[0, 0, 0, 0]);
        corrupt[2 * BLKCHECK_BLOCK_SIZE + 100] ^= 1;
        let error = verify_blkcheck_bytes(&corrupt, 4, 4).unwrap_err();
        assert!(
            matches!(error, BlkcheckDiskError::BadBlock { index: 2, .. }),
            "{error}"
        );

        let mut lost = blkcheck_disk(4, &[0, 0, 0, 0]);
        lost[3 * BLKCHECK_BLOCK_SIZE..].fill(0);
        assert!(verify_blkcheck_bytes(&lost, 4, 4).is_err());
        assert!(verify_blkcheck_bytes(&lost, 4, 3).is_ok());

        assert!(matches!(
            verify_blkcheck_bytes(&lost[..100], 4, 4),
            Err(BlkcheckDiskError::TooSmall { .. })
        ));
        assert!(verify_blkcheck_bytes(&lost, u64::MAX, 4).is_err());
    }

    #[test]
    fn pvh_entry_point_rejects_malformed_images_without_panicking() {
        assert_eq!(pvh_entry_point(b""), None);
        assert_eq!(pvh_entry_point(b"not an elf file at all"), None);
        let image = fs::read(guest_image("counter").unwrap()).unwrap();
        for length in [5, 0x20, 0x40, 0x100, image.len() / 2] {
            // Truncations either still hold the note (it sits early) or give None.
            let _ = pvh_entry_point(&image[..length]);
        }
        let mut no_note = image.clone();
        let table = read_u64(&image, 0x20).unwrap() as usize;
        for index in 0..read_u16(&image, 0x38).unwrap() as usize {
            let header = table + index * 56;
            if read_u32(&image, header) == Some(4) {
                no_note[header..header + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        assert_eq!(pvh_entry_point(&no_note), None);
        assert!(pvh_entry_point(&image).is_some());
    }
}
