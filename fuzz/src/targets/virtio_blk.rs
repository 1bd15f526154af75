//! The virtio-blk request parser (`devices/src/virtio/block/request.rs`): guest memory of
//! arbitrary bytes holding the descriptor table, the rings, request headers and buffers; one
//! request is popped from the queue and served against a small disk file, as the I/O thread does.
//!
//! Promises checked: no panic, a status the spec knows (OK, IOERR, UNSUPP), a used length no
//! larger than the device-writable buffers, and the disk never grows (no write past its end) and
//! is never written when it is read-only.

use std::io::Write;
use std::path::PathBuf;

use devices::virtio::Block;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{signature, Target};

/// Guest memory: two 32 KiB regions, so a buffer may straddle two host mappings as it can on a
/// VM whose RAM is in several zones.
const REGION: usize = 32 << 10;
const REGIONS: [(GuestAddress, usize); 2] = [
    (GuestAddress(0), REGION),
    (GuestAddress(REGION as u64), REGION),
];
const QUEUE_SIZE: u16 = 16;
/// One page each for the descriptor table, the available ring and the used ring.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = DESC_TABLE + 0x1000;
const USED_RING: u64 = AVAIL_RING + 0x1000;
const DISK_SECTORS: u64 = 16;

pub struct VirtioBlkTarget {
    _dir: tempfile::TempDir,
    disk_path: PathBuf,
    readonly_path: PathBuf,
    disk: Block,
    readonly_disk: Block,
}

fn pattern() -> Vec<u8> {
    (0..DISK_SECTORS * 512).map(|i| (i * 7) as u8).collect()
}

impl VirtioBlkTarget {
    pub fn new() -> anyhow::Result<VirtioBlkTarget> {
        let dir = super::scratch_dir()?;
        let disk_path = dir.path().join("disk.img");
        let readonly_path = dir.path().join("ro.img");
        std::fs::write(&disk_path, pattern())?;
        std::fs::write(&readonly_path, pattern())?;
        let disk = Block::open(&disk_path, false)?;
        let readonly_disk = Block::open(&readonly_path, true)?;
        Ok(VirtioBlkTarget {
            _dir: dir,
            disk_path,
            readonly_path,
            disk,
            readonly_disk,
        })
    }
}

/// Guest memory for a request: a descriptor chain `head -> ... ` written by hand. Used for seeds.
fn seed(kind: u32, sector: u64, descriptors: &[(u64, u32, u16)], readonly: bool) -> Vec<u8> {
    let mut memory = vec![0u8; 0x4000];
    memory[0] = u8::from(readonly);
    for (index, (addr, len, flags)) in descriptors.iter().enumerate() {
        let at = DESC_TABLE as usize + index * 16;
        let next = if index + 1 < descriptors.len() {
            index as u16 + 1
        } else {
            0
        };
        let flags = if index + 1 < descriptors.len() {
            flags | 1
        } else {
            *flags
        };
        memory[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        memory[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        memory[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        memory[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }
    // The header the first descriptor points at (0x3000).
    memory[0x3000..0x3004].copy_from_slice(&kind.to_le_bytes());
    memory[0x3008..0x3010].copy_from_slice(&sector.to_le_bytes());
    memory
}

fn hash_file(path: &PathBuf) -> (u64, u64) {
    let bytes = std::fs::read(path).unwrap_or_default();
    (bytes.len() as u64, signature(&[&bytes]))
}

impl Target for VirtioBlkTarget {
    fn name(&self) -> &'static str {
        "virtio_blk"
    }

    fn seeds(&mut self) -> Vec<Vec<u8>> {
        const WRITE: u16 = 2;
        vec![
            // read 2 sectors, write 1 sector, flush, get-id, unsupported, bad header
            seed(
                0,
                1,
                &[(0x3000, 16, 0), (0x3100, 1024, WRITE), (0x3f00, 1, WRITE)],
                false,
            ),
            seed(
                1,
                15,
                &[(0x3000, 16, 0), (0x3100, 512, 0), (0x3f00, 1, WRITE)],
                false,
            ),
            seed(
                1,
                0,
                &[(0x3000, 16, 0), (0x3100, 512, 0), (0x3f00, 1, WRITE)],
                true,
            ),
            seed(4, 0, &[(0x3000, 16, 0), (0x3f00, 1, WRITE)], false),
            seed(
                8,
                0,
                &[(0x3000, 16, 0), (0x3100, 20, WRITE), (0x3f00, 1, WRITE)],
                false,
            ),
            seed(99, 0, &[(0x3000, 16, 0), (0x3f00, 1, WRITE)], false),
            seed(
                0,
                u64::MAX,
                &[(0x3000, 16, 0), (0x3100, 512, WRITE), (0x3f00, 1, WRITE)],
                false,
            ),
            seed(0, 0, &[(0x3000, 8, 0), (0x3f00, 1, WRITE)], false),
            // write then read 3 sectors from two buffers, one across the two regions
            seed(
                1,
                4,
                &[
                    (0x3000, 16, 0),
                    (0x7f00, 1024, 0),
                    (0x3100, 512, 0),
                    (0x3f00, 1, WRITE),
                ],
                false,
            ),
            seed(
                0,
                4,
                &[
                    (0x3000, 16, 0),
                    (0x7e00, 1024, WRITE),
                    (0x3100, 512, WRITE),
                    (0x3f00, 1, WRITE),
                ],
                false,
            ),
        ]
    }

    fn max_len(&self) -> usize {
        0x4000
    }

    fn fixed_size(&self) -> bool {
        true
    }

    fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
        let readonly = input.first().is_some_and(|b| b & 1 == 1);
        let path = if readonly {
            &self.readonly_path
        } else {
            &self.disk_path
        };
        let before = hash_file(path);
        let memory = GuestMemoryMmap::<()>::from_ranges(&REGIONS)
            .map_err(|e| format!("guest memory: {e}"))?;
        memory
            .write_slice(&input[..input.len().min(2 * REGION)], GuestAddress(0))
            .map_err(|e| format!("filling guest memory: {e}"))?;
        // One request on the available ring; its head index comes from the input.
        let head = u16::from(input.get(1).copied().unwrap_or(0)) % QUEUE_SIZE;
        let ring: [u16; 3] = [0, 1, head];
        for (index, value) in ring.iter().enumerate() {
            memory
                .write_obj(*value, GuestAddress(AVAIL_RING + 2 * index as u64))
                .map_err(|e| e.to_string())?;
        }
        let mut queue = Queue::new(QUEUE_SIZE).map_err(|e| e.to_string())?;
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        let Some(chain) = queue.pop_descriptor_chain(&memory) else {
            return Ok(signature(&[b"no chain"]));
        };
        // Device-writable bytes of the chain (a copy of the iteration the device does).
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        let disk = if readonly {
            &self.readonly_disk
        } else {
            &self.disk
        };
        let outcome = disk.serve_chain(chain, &memory);
        let after = hash_file(path);
        if after.0 != before.0 {
            return Err(format!(
                "the disk changed size: {} -> {} bytes",
                before.0, after.0
            ));
        }
        if readonly && after.1 != before.1 {
            return Err("a read-only disk was written".into());
        }
        if !readonly && after.1 != before.1 {
            // Restore the pattern in place so every input starts from the same disk.
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|mut f| f.write_all(&pattern()))
                .map_err(|e| e.to_string())?;
        }
        match outcome {
            None => Ok(signature(&[b"dropped"])),
            Some((status, used_len)) => {
                if status > 2 {
                    return Err(format!("status {status} is not a virtio-blk status"));
                }
                if u64::from(used_len) > writable {
                    return Err(format!(
                        "used length {used_len} exceeds the {writable} device-writable bytes"
                    ));
                }
                Ok(signature(&[&[status], &used_len.min(2048).to_le_bytes()]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_with_a_buffer_across_two_regions_are_served() {
        let mut target = VirtioBlkTarget::new().unwrap();
        let seeds = target.seeds();
        let [.., write, read] = &seeds[..] else {
            panic!("seeds missing");
        };
        let served = |used_len: u32| Ok(signature(&[&[0], &used_len.to_le_bytes()]));
        assert_eq!(target.execute(write), served(1), "write of 3 sectors: OK");
        assert_eq!(
            target.execute(read),
            served(3 * 512 + 1),
            "read of 3 sectors: OK"
        );
    }
}
