//! Laying out a new, empty region over whatever a store holds.

use crate::allocator::align_up;
use crate::error::{Error, Result};
use crate::identity::Uuid;
use crate::metadata_io::{table_copy_offset, write_superblock, write_table};
use crate::persistence::Persistence;
use crate::region::OpenOptions;
use crate::superblock::{self, ShutdownMarker, Superblock};
use crate::vm_table::{self, VmTable};

/// Writes a fresh, empty region over whatever the store holds.
pub(crate) fn format(store: &mut dyn Persistence, options: &OpenOptions) -> Result<Superblock> {
    let align = options.extent_alignment;
    if !align.is_power_of_two() || align < 4096 {
        return Err(Error::InvalidSize {
            size: align,
            reason: "extent alignment must be a power of two of at least 4096",
        });
    }
    if !options.state_slot_len.is_multiple_of(4096) || options.state_slot_len < 4096 {
        return Err(Error::InvalidSize {
            size: options.state_slot_len,
            reason: "state slot size must be a non-zero multiple of 4096",
        });
    }
    if !options.table_copy_len.is_multiple_of(4096) || options.table_copy_len < 4096 {
        return Err(Error::InvalidSize {
            size: options.table_copy_len,
            reason: "VM table copy size must be a non-zero multiple of 4096",
        });
    }
    let table_offset = superblock::AREA_LEN;
    let data_start =
        align_up(table_offset + 2 * options.table_copy_len, align).ok_or(Error::InvalidSize {
            size: options.table_copy_len,
            reason: "VM table too large",
        })?;
    let region_size = match options.region_size {
        Some(size) => {
            let size = size & !(align - 1);
            if size < data_start {
                return Err(Error::InvalidSize {
                    size,
                    reason: "region too small for its metadata",
                });
            }
            size
        }
        // An existing device or file keeps its size; a new file starts with the metadata only.
        None => (store.len() & !(align - 1)).max(data_start),
    };
    if store.len() < region_size {
        store.grow(region_size)?;
    }
    let sb = Superblock {
        format_version: superblock::FORMAT_VERSION,
        generation: 1,
        region_uuid: Uuid::random()?,
        region_size,
        extent_alignment: align,
        table_offset,
        table_copy_len: options.table_copy_len,
        data_start,
        state_slot_len: options.state_slot_len,
        shutdown_marker: ShutdownMarker::Clean,
    };
    // Old superblocks and table headers must be gone before the new ones appear,
    // or an old copy with a higher generation would win.
    let zero_header = [0u8; superblock::ENCODED_LEN];
    for index in 0..2 {
        store.write(Superblock::copy_offset(index), &zero_header)?;
        store.write(
            table_copy_offset(&sb, index),
            &zero_header[..vm_table::HEADER_LEN],
        )?;
    }
    store.persist(0, table_offset + 2 * sb.table_copy_len)?;
    write_table(
        store,
        &sb,
        &VmTable {
            generation: 1,
            entries: Vec::new(),
        },
    )?;
    write_superblock(store, &sb)?;
    log::info!(
        "formatted NV region {} ({} bytes)",
        sb.region_uuid,
        region_size
    );
    Ok(sb)
}
