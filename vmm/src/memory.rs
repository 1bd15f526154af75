//! Guest RAM: where its bytes come from (anonymous memory, a file, a DAX device, or a file handed
//! to us by the NV extension) and how they are laid out in guest-physical space.
//!
//! The guest sees one contiguous amount of RAM, split around the 32-bit device hole by
//! `arch::layout::ram_regions`. The backings (the `--memory size=` part first, then each
//! `--memory-zone` in command-line order) fill that layout in order, so one backing may straddle
//! the hole and then becomes two mappings at consecutive offsets of the same file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::config::MemoryConfig;
use crate::Error;

/// Guest RAM is mapped in pages of this size; every size and offset must be a multiple of it.
const PAGE_SIZE: u64 = 4096;

/// The size of an x86-64 PMD mapping (a transparent huge page): a mapping can use them only
/// where its host address and its file offset are both multiples of this.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// One source of guest RAM bytes, in the order it fills guest-physical space.
#[derive(Debug)]
enum Backing {
    Anonymous {
        size: u64,
        shared: bool,
        prefault: bool,
        /// `madvise(MADV_HUGEPAGE)` (upstream's `thp=on`, for private anonymous RAM only).
        thp: bool,
    },
    File {
        file: File,
        path: PathBuf,
        /// Where the guest's bytes start inside the file.
        offset: u64,
        size: u64,
        shared: bool,
        prefault: bool,
        /// `MAP_SYNC` (DAX only): page faults never leave file metadata the data depends on
        /// volatile, so a cache write-back alone makes guest stores durable.
        map_sync: bool,
        /// `madvise(MADV_HUGEPAGE)`: NV RAM, so that a tmpfs mounted `huge=advise` (or a
        /// shmem policy of `advise`) backs it with huge pages.
        thp: bool,
    },
}

impl Backing {
    fn size(&self) -> u64 {
        match self {
            Backing::Anonymous { size, .. } | Backing::File { size, .. } => *size,
        }
    }
}

/// Builds guest RAM as `config` describes it: `size` bytes of anonymous memory followed by each
/// zone (anonymous, or mapped from its `file`).
pub fn guest_memory_from_config(config: &MemoryConfig) -> Result<GuestMemoryMmap, Error> {
    if config.hugepages || config.zones.iter().flatten().any(|zone| zone.hugepages) {
        return Err(Error::MemoryConfig(
            "hugepages=on is not supported by this VMM".to_string(),
        ));
    }
    let mut backings = Vec::new();
    if config.size > 0 {
        backings.push(anonymous_backing(
            "ram",
            config.size,
            config.shared,
            config.prefault,
            config.thp,
        )?);
    }
    for zone in config.zones.iter().flatten() {
        if zone.size == 0 {
            return Err(Error::MemoryConfig(format!(
                "memory zone {}: size must not be 0",
                zone.id
            )));
        }
        match &zone.file {
            None => backings.push(anonymous_backing(
                &zone.id,
                zone.size,
                zone.shared,
                zone.prefault,
                config.thp,
            )?),
            Some(path) => {
                let (file, path) = open_zone_file(Path::new(path), zone.size)?;
                backings.push(Backing::File {
                    file,
                    path,
                    offset: 0,
                    size: zone.size,
                    shared: zone.shared,
                    prefault: zone.prefault,
                    map_sync: false,
                    thp: false,
                });
            }
        }
    }
    map_backings(backings)
}

/// RAM that no file of the user backs: private anonymous memory, or, when `shared`, a memfd of
/// `size` bytes (as upstream): shared RAM exists to be mapped by another process (a vhost-user
/// backend), which needs a file descriptor of it for SET_MEM_TABLE. `name` labels the memfd
/// (`/proc/PID/fd`, `/proc/PID/maps`).
fn anonymous_backing(
    name: &str,
    size: u64,
    shared: bool,
    prefault: bool,
    thp: bool,
) -> Result<Backing, Error> {
    if !shared {
        return Ok(Backing::Anonymous {
            size,
            shared,
            prefault,
            thp,
        });
    }
    let path = PathBuf::from(format!("memfd:{name}"));
    let memfd_error = |operation| {
        let path = path.clone();
        move |source: rustix::io::Errno| Error::MemoryFile {
            path,
            operation,
            source: source.into(),
        }
    };
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(memfd_error("memfd_create"))?;
    rustix::fs::ftruncate(&fd, size).map_err(memfd_error("size"))?;
    Ok(Backing::File {
        file: File::from(fd),
        path,
        offset: 0,
        size,
        shared: true,
        prefault,
        map_sync: false,
        thp: false,
    })
}

/// Builds guest RAM from `size` bytes of `file` starting at `offset`, mapped shared (and `MAP_SYNC`
/// when `map_sync`, for DAX). This is how NV memory arrives: the NV extension owns the region
/// layout and hands over only (file, offset, size, whether it is DAX).
pub fn guest_memory_from_file(
    file: File,
    path: &Path,
    offset: u64,
    size: u64,
    map_sync: bool,
) -> Result<GuestMemoryMmap, Error> {
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(Error::MemoryConfig(format!(
            "{}: offset {offset:#x} is not a multiple of the page size",
            path.display()
        )));
    }
    map_backings(vec![Backing::File {
        file,
        path: path.to_path_buf(),
        offset,
        size,
        shared: true,
        prefault: false,
        map_sync,
        thp: true,
    }])
}

/// Asks for transparent huge pages on private anonymous guest RAM, as upstream does with `thp=on`:
/// fewer TLB misses and page faults for the guest. Only advice, so a kernel without THP (or with
/// it set to `never`) is logged, not refused.
fn advise_huge_pages(mapping: &vm_memory::mmap::MmapRegion, length: usize) {
    // SAFETY: the range is exactly the mapping just created and still owned by `mapping`;
    // MADV_HUGEPAGE only changes how the kernel backs it, never its contents or validity.
    let result = unsafe { libc::madvise(mapping.as_ptr().cast(), length, libc::MADV_HUGEPAGE) };
    if result != 0 {
        log::info!(
            "madvise(MADV_HUGEPAGE) on {length:#x} bytes of guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How the host maps guest RAM, read from `/proc/self/smaps` for the guest's mappings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HugePageReport {
    /// Every mapping starts at a 2 MiB-aligned host address (a precondition of PMD mappings).
    pub aligned: bool,
    /// Every mapping is advised for transparent huge pages (`MADV_HUGEPAGE`, `hg` in VmFlags).
    pub advised: bool,
    /// Bytes of guest RAM mapped by huge pages right now: `AnonHugePages` + `ShmemPmdMapped` +
    /// `FilePmdMapped` (a page the guest has not touched yet is not mapped at all).
    pub huge_page_bytes: u64,
}

/// One mapping of `/proc/self/smaps`: its address range and the lines that describe it.
struct SmapsEntry<'a> {
    start: u64,
    end: u64,
    lines: Vec<&'a str>,
}

impl SmapsEntry<'_> {
    /// A `Name:   N kB` field in bytes (0 when absent).
    fn bytes(&self, name: &str) -> u64 {
        self.lines
            .iter()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .next()
            .unwrap_or(0)
            * 1024
    }

    fn flags(&self) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .find_map(|line| line.strip_prefix("VmFlags:"))
            .unwrap_or("")
            .split_whitespace()
    }
}

/// Splits the text of `/proc/self/smaps` into its mappings.
fn smaps_entries(smaps: &str) -> Vec<SmapsEntry<'_>> {
    let mut entries: Vec<SmapsEntry> = Vec::new();
    for line in smaps.lines() {
        let range = line
            .split_once(' ')
            .and_then(|(range, _)| range.split_once('-'))
            .and_then(|(start, end)| {
                Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                ))
            });
        match (range, entries.last_mut()) {
            (Some((start, end)), _) => entries.push(SmapsEntry {
                start,
                end,
                lines: Vec::new(),
            }),
            (None, Some(entry)) => entry.lines.push(line),
            (None, None) => {}
        }
    }
    entries
}

/// Reads from `/proc/self/smaps` how the host maps `memory`: whether it is 2 MiB-aligned and
/// advised for huge pages, and how much of it huge pages map now.
pub fn huge_page_report(memory: &GuestMemoryMmap) -> std::io::Result<HugePageReport> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(huge_page_report_from(&smaps, memory))
}

fn huge_page_report_from(smaps: &str, memory: &GuestMemoryMmap) -> HugePageReport {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let entries = smaps_entries(smaps);
    let mut report = HugePageReport {
        aligned: true,
        advised: true,
        huge_page_bytes: 0,
    };
    for region in memory.iter() {
        let start = region.as_ptr() as u64;
        let end = start + region.len();
        report.aligned &= start.is_multiple_of(HUGE_PAGE_SIZE);
        // madvise may have split one mapping into several; the guest's range covers them all.
        for entry in entries
            .iter()
            .filter(|entry| entry.start < end && start < entry.end)
        {
            report.advised &= entry.flags().any(|flag| flag == "hg");
            report.huge_page_bytes += ["AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"]
                .iter()
                .map(|name| entry.bytes(name))
                .sum::<u64>();
        }
    }
    report
}

/// Opens a zone's backing file and makes sure it holds at least `size` bytes: a regular file that
/// is smaller is grown (sparse), a larger one is used as is, a devdax device must already be large
/// enough and `size` must respect its mapping alignment.
fn open_zone_file(path: &Path, size: u64) -> Result<(File, PathBuf), Error> {
    let file_error = |operation: &'static str| {
        let path = path.to_path_buf();
        move |source| Error::MemoryFile {
            path,
            operation,
            source,
        }
    };
    // As upstream, a missing file is an error: creating one would hide a typo in the path.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(file_error("open"))?;
    let metadata = file.metadata().map_err(file_error("stat"))?;
    if metadata.file_type().is_char_device() {
        let device = DaxDevice::probe(path, metadata.rdev())?;
        if size > device.size {
            return Err(Error::MemoryConfig(format!(
                "{}: zone size {size:#x} exceeds the device size {:#x}",
                path.display(),
                device.size
            )));
        }
        if !size.is_multiple_of(device.alignment) {
            return Err(Error::MemoryConfig(format!(
                "{}: zone size {size:#x} is not a multiple of the device alignment {:#x}",
                path.display(),
                device.alignment
            )));
        }
    } else if metadata.is_file() {
        if metadata.len() < size {
            file.set_len(size).map_err(file_error("grow"))?;
        }
    } else {
        return Err(Error::MemoryConfig(format!(
            "{}: not a regular file or a devdax device",
            path.display()
        )));
    }
    Ok((file, path.to_path_buf()))
}

/// What sysfs says about a `/dev/daxX.Y` character device.
struct DaxDevice {
    size: u64,
    /// Mappings of the device must be aligned to (and sized in multiples of) this.
    alignment: u64,
}

impl DaxDevice {
    fn probe(path: &Path, rdev: u64) -> Result<DaxDevice, Error> {
        let sysfs = PathBuf::from(format!(
            "/sys/dev/char/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        ));
        let read_number = |name: &str| -> Result<u64, Error> {
            let candidates = [sysfs.join(name), sysfs.join("device").join(name)];
            for candidate in &candidates {
                if let Some(value) = std::fs::read_to_string(candidate)
                    .ok()
                    .and_then(|text| parse_sysfs_number(&text))
                {
                    return Ok(value);
                }
            }
            Err(Error::MemoryConfig(format!(
                "{}: character device without a readable devdax '{name}' in {} \
                 (only devdax character devices can back guest memory)",
                path.display(),
                sysfs.display()
            )))
        };
        let size = read_number("size")?;
        let alignment = read_number("align")?;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(Error::MemoryConfig(format!(
                "{}: unusable devdax alignment {alignment:#x}",
                path.display()
            )));
        }
        Ok(DaxDevice { size, alignment })
    }
}

/// A sysfs attribute holding one number, decimal or `0x` hex, with a trailing newline.
fn parse_sysfs_number(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Splits the backings over the guest-physical RAM layout and maps each piece.
fn map_backings(backings: Vec<Backing>) -> Result<GuestMemoryMmap, Error> {
    let total: u64 = backings.iter().map(Backing::size).sum();
    if total == 0 {
        return Err(Error::MemoryConfig("guest RAM size is 0".to_string()));
    }
    if let Some(bad) = backings
        .iter()
        .find(|b| !b.size().is_multiple_of(PAGE_SIZE))
    {
        return Err(Error::MemoryConfig(format!(
            "memory size {:#x} is not a multiple of 4 KiB",
            bad.size()
        )));
    }
    let layout = arch::layout::ram_regions(total);
    let mut regions = Vec::new();
    let mut backing_iter = backings.iter();
    let mut current = backing_iter.next();
    let mut used_of_current = 0u64;
    for (region_start, region_size) in layout {
        let mut placed = 0u64;
        while placed < region_size {
            let Some(backing) = current else {
                return Err(Error::MemoryLayout(format!(
                    "layout of {total:#x} bytes asks for more RAM than the backings provide"
                )));
            };
            let chunk = (backing.size() - used_of_current).min(region_size - placed);
            let guest_address = GuestAddress(region_start.0 + placed);
            regions.push(map_piece(backing, used_of_current, chunk, guest_address)?);
            placed += chunk;
            used_of_current += chunk;
            if used_of_current == backing.size() {
                current = backing_iter.next();
                used_of_current = 0;
            }
        }
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::GuestMemoryMap)
}

/// Maps `size` bytes of `backing` starting `offset_in_backing` bytes into it, at `guest_address`.
fn map_piece(
    backing: &Backing,
    offset_in_backing: u64,
    size: u64,
    guest_address: GuestAddress,
) -> Result<GuestRegionMmap, Error> {
    let length = usize::try_from(size).map_err(|_| Error::MemoryMapTooLarge { size })?;
    let (flags, file_offset, prefault) = match backing {
        Backing::Anonymous {
            shared, prefault, ..
        } => {
            let sharing = if *shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            // NORESERVE: guest RAM is committed page by page as the guest touches it.
            (
                sharing | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                None,
                *prefault,
            )
        }
        Backing::File {
            file,
            path,
            offset,
            shared,
            prefault,
            map_sync,
            ..
        } => {
            let clone = file.try_clone().map_err(|source| Error::MemoryFile {
                path: path.clone(),
                operation: "dup",
                source,
            })?;
            let sharing = match (*shared, *map_sync) {
                // MAP_SYNC is honoured only with MAP_SHARED_VALIDATE (which refuses it where
                // unsupported instead of silently ignoring it).
                (true, true) => libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
                (true, false) => libc::MAP_SHARED,
                (false, _) => libc::MAP_PRIVATE,
            };
            (
                sharing | libc::MAP_NORESERVE,
                Some(FileOffset::new(clone, offset + offset_in_backing)),
                *prefault,
            )
        }
    };
    let flags = if prefault {
        flags | libc::MAP_POPULATE
    } else {
        flags
    };
    let mut builder = MmapRegionBuilder::new(length)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags);
    if let Some(file_offset) = file_offset {
        builder = builder.with_file_offset(file_offset);
    }
    let mapping = builder.build().map_err(|source| {
        let what = match backing {
            Backing::File { path, .. } => {
                format!("{} at guest {guest_address:#x?}", path.display())
            }
            Backing::Anonymous { .. } => {
                format!("anonymous memory at guest {:#x}", guest_address.0)
            }
        };
        Error::MemoryMap { size, what, source }
    })?;
    if let Backing::Anonymous { thp: true, .. } | Backing::File { thp: true, .. } = backing {
        advise_huge_pages(&mapping, length);
    }
    if let Backing::File { offset, .. } = backing {
        // The kernel picks the address. Where the backing can map huge pages (a tmpfs mounted
        // with `huge=`, a DAX file system or device, a file system with large folios) it picks
        // one congruent to the file offset modulo 2 MiB; extents are 2 MiB-aligned in the file,
        // so the mapping is too. Elsewhere (tmpfs `huge=never`) the address does not matter.
        let file_offset = offset + offset_in_backing;
        let host = mapping.as_ptr() as u64;
        if size >= HUGE_PAGE_SIZE && host % HUGE_PAGE_SIZE != file_offset % HUGE_PAGE_SIZE {
            log::debug!(
                "guest RAM at {guest_address:#x?} mapped at {host:#x}, not 2 MiB-aligned with \
                 its file offset {file_offset:#x}: the backing cannot map huge pages"
            );
        }
    }
    GuestRegionMmap::new(mapping, guest_address).ok_or_else(|| {
        Error::MemoryLayout(format!(
            "region at {:#x} of {size:#x} bytes overflows the address space",
            guest_address.0
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryZoneConfig;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn zone(id: &str, size: u64, file: Option<&Path>) -> MemoryZoneConfig {
        MemoryZoneConfig {
            id: id.to_string(),
            size,
            file: file.map(|p| p.display().to_string()),
            shared: true,
            ..Default::default()
        }
    }

    /// Guest memory of `anonymous` bytes of anonymous RAM, then one shared zone "mem0" of
    /// `zone_size` bytes backed by `path`.
    fn memory_with_zone_file(
        anonymous: u64,
        zone_size: u64,
        path: &Path,
    ) -> Result<GuestMemoryMmap, Error> {
        guest_memory_from_config(&MemoryConfig {
            size: anonymous,
            zones: Some(vec![zone("mem0", zone_size, Some(path))]),
            ..Default::default()
        })
    }

    /// A new temporary directory (the returned guard) holding the path `ram`; the file is created
    /// with `len` bytes unless `len` is `None`.
    fn temp_ram_file(len: Option<u64>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        if let Some(len) = len {
            File::create(&path).unwrap().set_len(len).unwrap();
        }
        (dir, path)
    }

    #[test]
    fn a_missing_zone_file_is_an_error_and_is_not_created() {
        let (_dir, path) = temp_ram_file(None);
        let error = memory_with_zone_file(0, 2 << 20, &path)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(!path.exists(), "the zone file was created");
    }

    /// The `VmFlags` of the mapping that holds `address`, from `/proc/self/smaps`.
    fn vm_flags(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let address = address as u64;
        let entries = smaps_entries(&smaps);
        let entry = entries
            .iter()
            .find(|entry| (entry.start..entry.end).contains(&address))
            .unwrap_or_else(|| panic!("no mapping holds {address:#x}"));
        entry.flags().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn thp_advises_private_anonymous_ram_only() {
        let advised = |thp: bool, shared: bool| {
            let config = MemoryConfig {
                size: 4 << 20,
                thp,
                shared,
                ..Default::default()
            };
            let memory = guest_memory_from_config(&config).unwrap();
            let host = memory.get_host_address(GuestAddress(0)).unwrap() as usize;
            // "hg": VM_HUGEPAGE, set by madvise(MADV_HUGEPAGE).
            vm_flags(host).split(' ').any(|flag| flag == "hg")
        };
        assert!(advised(true, false), "thp=on (the default) must advise");
        assert!(!advised(false, false), "thp=off must not advise");
        assert!(!advised(true, true), "shared RAM is never advised");
    }

    /// `shared=on` RAM without a file is a memfd, as upstream: a vhost-user backend needs a file
    /// descriptor of guest RAM (SET_MEM_TABLE), which anonymous memory has not. The memfd is
    /// unnamed (no link), writes through the guest mapping reach it, and a zone gets its own.
    #[test]
    fn shared_ram_without_a_file_is_a_memfd_the_backend_can_map() {
        let config = MemoryConfig {
            size: 4 << 20,
            shared: true,
            zones: Some(vec![MemoryZoneConfig {
                file: None,
                ..zone("z0", 2 << 20, None)
            }]),
            ..Default::default()
        };
        let memory = guest_memory_from_config(&config).unwrap();
        assert_eq!(memory.num_regions(), 2);
        let mut files = Vec::new();
        for region in memory.iter() {
            assert_ne!(region.flags() & libc::MAP_SHARED, 0);
            let file_offset = region
                .file_offset()
                .expect("shared RAM has a file descriptor");
            let file = file_offset.file();
            assert_eq!(file_offset.start(), 0);
            assert_eq!(file.metadata().unwrap().nlink(), 0, "a memfd has no name");
            assert_eq!(file.metadata().unwrap().len(), region.len());
            files.push(file.try_clone().unwrap());
        }
        memory.write_obj(0x5a5a_u16, GuestAddress(0x1000)).unwrap();
        let mut bytes = [0u8; 2];
        use std::os::unix::fs::FileExt;
        files[0].read_exact_at(&mut bytes, 0x1000).unwrap();
        assert_eq!(u16::from_le_bytes(bytes), 0x5a5a);

        // Private RAM stays anonymous.
        let private = guest_memory_from_config(&MemoryConfig {
            size: 4 << 20,
            ..Default::default()
        })
        .unwrap();
        assert!(private.iter().all(|region| region.file_offset().is_none()));
    }

    #[test]
    fn anonymous_memory_is_one_region_below_the_hole() {
        let config = MemoryConfig {
            size: 8 << 20,
            ..Default::default()
        };
        let memory = guest_memory_from_config(&config).unwrap();
        assert_eq!(memory.num_regions(), 1);
        let region = memory.iter().next().unwrap();
        assert_eq!(region.start_addr(), GuestAddress(0));
        assert_eq!(region.len(), 8 << 20);
    }

    #[test]
    fn smaller_file_is_grown_and_guest_writes_reach_the_file() {
        let (_dir, path) = temp_ram_file(Some(1));
        let memory = memory_with_zone_file(0, 4 << 20, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        drop(memory);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x1000..0x1004], &0xdead_beef_u32.to_le_bytes());
    }

    #[test]
    fn larger_file_is_used_as_is() {
        let (_dir, path) = temp_ram_file(Some(16 << 20));
        let memory = memory_with_zone_file(0, 4 << 20, &path).unwrap();
        assert_eq!(memory.iter().map(|r| r.len()).sum::<u64>(), 4 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
    }

    #[test]
    fn anonymous_part_comes_first_then_the_zone() {
        let (_dir, path) = temp_ram_file(Some(0));
        let memory = memory_with_zone_file(2 << 20, 2 << 20, &path).unwrap();
        memory.write_obj(0x55_u8, GuestAddress(2 << 20)).unwrap();
        drop(memory);
        assert_eq!(std::fs::read(&path).unwrap()[0], 0x55);
    }

    #[test]
    fn external_backing_starts_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let file = File::create_new(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let memory =
            guest_memory_from_file(file.try_clone().unwrap(), &path, 2 << 20, 4 << 20, false)
                .unwrap();
        memory.write_obj(0xa5_u8, GuestAddress(0)).unwrap();
        drop(memory);
        assert_eq!(std::fs::read(&path).unwrap()[2 << 20], 0xa5);
        // The temp dir is not DAX, so the kernel refuses MAP_SYNC: proof the flag reaches mmap.
        assert!(guest_memory_from_file(file, &path, 2 << 20, 4 << 20, true).is_err());
    }

    /// A tmpfs mounted `huge=always` on a new temporary directory, unmounted on drop; `None`
    /// where this process may not mount (not root).
    struct HugeTmpfs(tempfile::TempDir);

    impl HugeTmpfs {
        fn mount() -> Option<HugeTmpfs> {
            use std::ffi::CString;
            use std::os::unix::ffi::OsStrExt;
            let dir = tempfile::tempdir().unwrap();
            let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
            let kind = CString::new("tmpfs").unwrap();
            let data = CString::new("huge=always,size=64m").unwrap();
            // SAFETY: plain C strings that outlive the call; mounts on our own new directory.
            let rc = unsafe {
                libc::mount(
                    kind.as_ptr(),
                    target.as_ptr(),
                    kind.as_ptr(),
                    0,
                    data.as_ptr().cast(),
                )
            };
            (rc == 0).then_some(HugeTmpfs(dir))
        }
    }

    impl Drop for HugeTmpfs {
        fn drop(&mut self) {
            use std::os::unix::ffi::OsStrExt;
            let target = std::ffi::CString::new(self.0.path().as_os_str().as_bytes()).unwrap();
            // SAFETY: detaches the mount made by `mount` on this directory.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }

    /// NV RAM: `size` bytes at `offset` of a new file `ram` in `dir`, as the NV path maps it.
    fn nv_memory(dir: &Path, offset: u64, size: u64) -> GuestMemoryMmap {
        let path = dir.join("ram");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(offset + size).unwrap();
        guest_memory_from_file(file, &path, offset, size, false).unwrap()
    }

    /// Writes one byte in every 4 KiB page of guest RAM `[0, len)`.
    fn touch(memory: &GuestMemoryMmap, len: u64) {
        for page in (0..len).step_by(PAGE_SIZE as usize) {
            memory.write_obj(1u8, GuestAddress(page)).unwrap();
        }
    }

    #[test]
    fn nv_ram_on_a_huge_tmpfs_is_aligned_advised_and_huge_page_mapped() {
        let Some(huge) = HugeTmpfs::mount() else {
            panic!("this test needs to mount a tmpfs (huge=always): run it as root");
        };
        // The extent starts 2 MiB into the file, as NV extents do.
        let memory = nv_memory(huge.0.path(), 2 << 20, 8 << 20);
        let before = huge_page_report(&memory).unwrap();
        assert!(before.aligned, "{before:?}");
        assert!(
            before.advised,
            "NV RAM must be advised for huge pages: {before:?}"
        );
        assert_eq!(before.huge_page_bytes, 0, "nothing touched yet: {before:?}");
        touch(&memory, 8 << 20);
        let after = huge_page_report(&memory).unwrap();
        assert_eq!(after.huge_page_bytes, 8 << 20, "{after:?}");
    }

    #[test]
    fn nv_ram_on_a_plain_tmpfs_reports_no_huge_pages() {
        // /dev/shm is mounted without `huge=` here (and on most hosts): 4 KiB pages only.
        let shmem_huge = std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|line| line.contains(" /dev/shm ") && line.contains("huge="));
        assert!(!shmem_huge, "/dev/shm is mounted with huge pages here");
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let memory = nv_memory(dir.path(), 2 << 20, 4 << 20);
        touch(&memory, 4 << 20);
        let report = huge_page_report(&memory).unwrap();
        assert!(report.advised, "{report:?}");
        assert_eq!(report.huge_page_bytes, 0, "{report:?}");
    }

    #[test]
    fn huge_page_report_sums_every_mapping_of_guest_ram() {
        let memory = guest_memory_from_config(&MemoryConfig {
            size: 4 << 20,
            ..Default::default()
        })
        .unwrap();
        let start = memory.get_host_address(GuestAddress(0)).unwrap() as u64;
        let (middle, end) = (start + (2 << 20), start + (4 << 20));
        // madvise split the guest's mapping in two; a neighbour outside it does not count.
        let smaps = format!(
            "{:x}-{start:x} rw-p 00000000 00:00 0\nAnonHugePages:  2048 kB\nVmFlags: rd wr hg\n\
             {start:x}-{middle:x} rw-p 00000000 00:00 0\nAnonHugePages:  2048 kB\n\
             VmFlags: rd wr mr hg\n\
             {middle:x}-{end:x} rw-s 00000000 00:05 7 /dev/shm/x\nShmemPmdMapped: 2048 kB\n\
             FilePmdMapped:      0 kB\nVmFlags: rd wr sh hg\n",
            start - 4096
        );
        let report = huge_page_report_from(&smaps, &memory);
        assert_eq!(report.huge_page_bytes, 4 << 20, "{report:?}");
        assert!(report.advised, "{report:?}");
        assert_eq!(report.aligned, start.is_multiple_of(HUGE_PAGE_SIZE));
        let unadvised = smaps.replace("sh hg", "sh");
        assert!(!huge_page_report_from(&unadvised, &memory).advised);
    }

    #[test]
    fn sysfs_numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_sysfs_number("2097152\n"), Some(2 << 20));
        assert_eq!(parse_sysfs_number("0x200000\n"), Some(2 << 20));
        assert_eq!(parse_sysfs_number("lots\n"), None);
        assert_eq!(parse_sysfs_number(""), None);
    }

    #[test]
    fn a_file_straddling_the_device_hole_maps_at_consecutive_offsets() {
        // 4 GiB of sparse file: 3 GiB below the hole, 1 GiB above 4 GiB. Nothing is touched
        // except two bytes, so the test costs no real memory.
        let (_dir, path) = temp_ram_file(Some(0));
        let memory = memory_with_zone_file(0, 4 << 30, &path).unwrap();
        let regions: Vec<_> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        memory
            .write_obj(0x11_u8, GuestAddress((3 << 30) - 1))
            .unwrap();
        memory.write_obj(0x22_u8, GuestAddress(4 << 30)).unwrap();
        drop(memory);
        let file = File::open(&path).unwrap();
        let mut bytes = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, (3 << 30) - 1).unwrap();
        assert_eq!(
            bytes,
            [0x11, 0x22],
            "guest 3G-1 and 4G are adjacent file bytes"
        );
    }

    #[test]
    fn nv_ram_of_64_gib_maps_past_32_bits_without_touching_it() {
        // A sparse 64 GiB extent 2 MiB into a file: only the two bytes written are ever allocated.
        let dir = tempfile::tempdir().unwrap();
        let size = 64u64 << 30;
        let memory = nv_memory(dir.path(), 2 << 20, size);
        let regions: Vec<_> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, size - (3 << 30))]);
        let last = GuestAddress((4 << 30) + size - (3 << 30) - 1);
        memory.write_obj(0x64_u8, last).unwrap();
        drop(memory);
        let file = File::open(dir.path().join("ram")).unwrap();
        let mut byte = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, (2 << 20) + size - 1).unwrap();
        assert_eq!(
            byte,
            [0x64],
            "the guest's last byte is the extent's last byte"
        );
        // Far from 64 GiB (a file system may allocate a whole large folio around the byte).
        let allocated = file.metadata().unwrap().blocks() * 512;
        assert!(allocated < 64 << 20, "{allocated} bytes allocated");
    }

    #[test]
    fn bad_sizes_are_refused_with_a_message() {
        let config = MemoryConfig {
            size: 4097,
            ..Default::default()
        };
        let error = guest_memory_from_config(&config).unwrap_err();
        assert!(error.to_string().contains("4 KiB"), "{error}");
        let config = MemoryConfig {
            size: 0,
            ..Default::default()
        };
        assert!(guest_memory_from_config(&config).is_err());
    }

    #[test]
    fn unopenable_file_names_the_path() {
        let config = MemoryConfig {
            size: 0,
            zones: Some(vec![zone(
                "mem0",
                4 << 20,
                Some(Path::new("/nonexistent-dir/ram")),
            )]),
            ..Default::default()
        };
        let error = guest_memory_from_config(&config).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent-dir/ram"),
            "{error}"
        );
    }
}
