//! Reading and committing the superblock and the VM table on a store.
//!
//! Both are two-copy structures: the copy for generation `g` is copy `g % 2`,
//! content is persisted before the header that vouches for it, and readers
//! take the valid copy with the highest generation.

use crate::error::{Error, Result};
use crate::persistence::{read_vec, Persistence};
use crate::superblock::{self, Superblock};
use crate::vm_table::{self, VmTable};

/// Reads one superblock copy; a copy beyond the end of the store counts as absent.
fn read_superblock_copy(store: &dyn Persistence, index: usize) -> Result<Option<Superblock>> {
    let offset = Superblock::copy_offset(index);
    if offset + superblock::ENCODED_LEN as u64 > store.len() {
        return Ok(None);
    }
    let mut buf = [0u8; superblock::ENCODED_LEN];
    store.read(offset, &mut buf)?;
    Superblock::decode(&buf)
}

pub(crate) fn read_superblock(store: &dyn Persistence) -> Result<Option<Superblock>> {
    let sb = superblock::select([
        read_superblock_copy(store, 0),
        read_superblock_copy(store, 1),
    ])?;
    if let Some(sb) = &sb {
        if sb.region_size > store.len() {
            return Err(Error::Truncated {
                expected: sb.region_size,
                actual: store.len(),
            });
        }
    }
    Ok(sb)
}

pub(crate) fn write_superblock(store: &mut dyn Persistence, sb: &Superblock) -> Result<()> {
    let offset = Superblock::copy_offset((sb.generation % 2) as usize);
    store.write(offset, &sb.encode())?;
    store.persist(offset, superblock::ENCODED_LEN as u64)
}

pub(crate) fn table_copy_offset(sb: &Superblock, index: usize) -> u64 {
    sb.table_offset + index as u64 * sb.table_copy_len
}

fn read_table_copy(store: &dyn Persistence, sb: &Superblock, index: usize) -> Result<VmTable> {
    let offset = table_copy_offset(sb, index);
    let mut header = [0u8; vm_table::HEADER_LEN];
    store.read(offset, &mut header)?;
    let (generation, body_len, count, body_crc) =
        VmTable::decode_header(&header, sb.table_copy_len)?;
    let body = read_vec(store, offset + vm_table::HEADER_LEN as u64, body_len)?;
    if crc32c::crc32c(&body) != body_crc {
        return Err(Error::CorruptVmTable("body checksum mismatch".into()));
    }
    let table = VmTable::decode_body(generation, &body, count)?;
    validate_extents(sb, &table)?;
    Ok(table)
}

/// Checks that the table's extents are inside the data area, aligned and disjoint.
fn validate_extents(sb: &Superblock, table: &VmTable) -> Result<()> {
    let mut extents = Vec::new();
    for entry in &table.entries {
        let slot_len = entry.state.len / 2;
        // A swapped-out VM has no extents, or the ones a swap-in under way reserved.
        let no_extents = entry.swap.is_some() && entry.memory.len == 0 && entry.state.len == 0;
        if entry.memory_size == 0
            || (!no_extents
                && (entry.memory_size > entry.memory.len
                    || entry.state.len % 2 != 0
                    || slot_len < 2 * crate::state_slots::HEADER_LEN as u64))
        {
            return Err(Error::CorruptVmTable(format!(
                "VM {:?} has impossible sizes",
                entry.name
            )));
        }
        if no_extents {
            continue;
        }
        let checkpoint = (entry.checkpoint.len > 0).then_some(entry.checkpoint);
        for extent in [entry.memory, entry.state].into_iter().chain(checkpoint) {
            let end = extent.offset.checked_add(extent.len);
            if extent.offset < sb.data_start
                || extent.offset % sb.extent_alignment != 0
                || end.is_none_or(|end| end > sb.region_size)
            {
                return Err(Error::CorruptVmTable(format!(
                    "VM {:?} has an extent outside the data area",
                    entry.name
                )));
            }
            extents.push(extent);
        }
    }
    extents.sort_by_key(|x| x.offset);
    if extents
        .windows(2)
        .any(|pair| pair[0].end() > pair[1].offset)
    {
        return Err(Error::CorruptVmTable("overlapping extents".into()));
    }
    Ok(())
}

pub(crate) fn read_table(store: &dyn Persistence, sb: &Superblock) -> Result<VmTable> {
    match (read_table_copy(store, sb, 0), read_table_copy(store, sb, 1)) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
        (Ok(t), Err(_)) | (Err(_), Ok(t)) => Ok(t),
        (Err(e), Err(_)) => Err(e),
    }
}

pub(crate) fn write_table(
    store: &mut dyn Persistence,
    sb: &Superblock,
    table: &VmTable,
) -> Result<()> {
    let body = table.encode_body();
    let capacity = sb.table_copy_len - vm_table::HEADER_LEN as u64;
    if body.len() as u64 > capacity {
        return Err(Error::VmTableFull {
            needed: body.len() as u64,
            capacity,
        });
    }
    let offset = table_copy_offset(sb, (table.generation % 2) as usize);
    // Body first and durable, then the header that vouches for it.
    store.write(offset + vm_table::HEADER_LEN as u64, &body)?;
    store.persist(offset + vm_table::HEADER_LEN as u64, body.len() as u64)?;
    store.write(offset, &table.encode_header(&body))?;
    store.persist(offset, vm_table::HEADER_LEN as u64)
}
